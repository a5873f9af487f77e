"""Data parallel ``flatcli train`` under torchrun: time per training epoch with 1 and 2 processes.

    python bench/distributed_train.py                                   # digits (embedded), ~1 min
    python bench/distributed_train.py --data-dir ../shared/data/mnist5k --dataset mnist

(The companion of ``bench/distributed.py``, which times Hessian-vector products.) Each
configuration runs ``flatcli train`` once with 1 process (``python -m flatcli``) and
once under ``python -m torch.distributed.run --nproc-per-node 2`` (gloo on the CPU, or
NCCL with one GPU per process), every process on ``--threads`` torch threads (default
1). The epoch time is the median over epochs 2.. of rank 0's ``seconds`` in
``metrics.jsonl`` (one epoch at the global ``--batch-size`` with its all-reduces, the
test-set evaluation and the resume state); the first epoch (warm-up) is left out.
Scaling efficiency = t1 / (N tN). The final train loss of each run is printed too: N
processes train the one-process recipe, so the losses agree to float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_epoch_seconds(
    procs: int, args: list[str], threads: int, folder: Path
) -> tuple[float, float]:
    """(median epoch seconds after the first, final train loss) of one ``flatcli train`` run."""
    out = folder / f"run-{procs}"
    flatcli = [
        "-m",
        "flatcli",
        "--threads",
        str(threads),
        "train",
        *args,
        "--out",
        str(out),
        "--json",
    ]
    if procs == 1:
        command = [sys.executable, *flatcli]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(procs),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            *flatcli,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(e["seconds"] for e in epochs[1:]), json.loads(done.stdout)[
        "train_loss"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--procs", default="1,2")
    a = parser.parse_args()
    print(
        f"# train epoch, {a.dataset}, global batch {a.batch_size}, {a.threads} thread(s) per process, "
        f"device {a.device}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'model':6s} {'procs':>5s} {'s/epoch':>9s} {'speed-up':>9s} {'efficiency':>10s} {'train loss':>12s}"
    )
    for model in a.models.split(","):
        args = [
            "--model",
            model,
            "--dataset",
            a.dataset,
            "--epochs",
            str(a.epochs),
            "--batch-size",
            str(a.batch_size),
            "--device",
            a.device,
        ]
        if a.data_dir:
            args += ["--data-dir", a.data_dir]
        with tempfile.TemporaryDirectory() as tmp:
            base = None
            for procs in map(int, a.procs.split(",")):
                seconds, loss = train_epoch_seconds(procs, args, a.threads, Path(tmp))
                base = base or seconds
                print(
                    f"{model:6s} {procs:5d} {seconds:9.3f} {base / seconds:8.2f}x {base / seconds / procs:10.0%} "
                    f"{loss:12.6f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
