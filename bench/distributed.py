"""Time Hessian-vector products with 1 and N data-parallel processes (torchrun), print ratios.

Each process measures a contiguous shard of the samples (``World.data_shard``), and every
data pass ends with an all-reduce of the shard sums (flatcli/curvature/operator.py
``_data_pass``). Per model and process count, the median over ``--repeats`` of:

* one HVP (``op.matvec``: what each Lanczos step costs), and
* a block of K HVPs in one data pass (``op.matmat``: Hutch++, SLQ probes),

each timed on rank 0 between barriers, so the time includes the all-reduce and the
slowest shard. Speed-up = time(1 process) / time(N); efficiency = speed-up / N.

    python bench/distributed.py [--nproc 1,2] [--k 16] [--repeats 7] [--device cpu|cuda]
    python bench/distributed.py --dataset mnist --data-dir ../shared/data/mnist5k --models mlp,cnn

Models: flatcli's ``mlp`` (width 64) and, on 1x28x28 data, its ``cnn``; seeded, float32.
Data: ``--n`` training images (digits: all 1,437). Every process runs one CPU thread
(``--threads``), so N processes need N free cores. Training epochs: bench/distributed_train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from flatcli import distributed
from flatcli.curvature import CurvatureOperator, memory_bounded
from flatcli.models import build_model
from flatcli.workflows.data import get_spec, load_dataset

#: environment variable that carries the parsed options to the torchrun workers
WORKER_ARGS = "FLATCLI_BENCH_DISTRIBUTED_ARGS"


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs between barriers (after a warm-up)."""
    fn()  # warm-up: allocations, cached graphs
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    world = distributed.init(args.device)
    device = torch.device(distributed.device_for(args.device) if args.device != "cpu" else "cpu")
    x, y = load_dataset(args.dataset, "train", args.data_dir, samples=args.n).tensors
    spec = get_spec(args.dataset)
    results = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        kwargs = {"width": 64} if name == "mlp" else {}
        model = build_model(
            name, input_shape=spec.input_shape, num_classes=spec.num_classes, **kwargs
        ).to(device)
        part = world.data_shard(len(y))
        xs, ys = x[part], y[part]
        op = CurvatureOperator(model, xs, ys, **memory_bounded(model, xs))
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(op.num_params, generator=gen).to(device)
        block = torch.randn(op.num_params, args.k, generator=gen).to(device)
        single = _timed(lambda op=op, v=v: op.matvec(v), device, args.repeats)
        many = _timed(lambda op=op, block=block: op.matmat(block), device, args.repeats)
        results[name] = {
            "params": op.num_params,
            "samples": op.num_samples,
            "batch": op.batch_size,
            "single_s": single,
            "block_s": many,
        }
    if world.is_main:
        print("RESULT " + json.dumps(results), flush=True)
    distributed.finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--models", default=None, help="default: mlp (digits), mlp,cnn (28x28 data)"
    )
    parser.add_argument(
        "--n", type=int, default=4000, help="training images (capped at the data set)"
    )
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.models is None:
        args.models = "mlp" if args.dataset == "digits" else "mlp,cnn"
    if args.dataset == "digits":
        args.n = None
    if args.worker:
        _worker(argparse.Namespace(**json.loads(os.environ[WORKER_ARGS])))
        return

    counts = [int(c) for c in args.nproc.split(",")]
    runs = {}
    for n in counts:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            __file__,
            "--worker",
        ]
        # the options go by the environment: torchrun's parser would take a prefix of its
        # own options (--n, --nproc) among the script's arguments for an ambiguous option
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            WORKER_ARGS: json.dumps(vars(args)),
        }
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{n} processes failed:\n{proc.stderr[-3000:]}")
        runs[n] = json.loads(lines[-1][len("RESULT ") :])

    print(
        f"data {args.dataset}, {args.device}, {args.threads} thread(s) per process, K = {args.k}, "
        f"medians of {args.repeats}; torch {torch.__version__}; {os.cpu_count()} CPUs"
    )
    header = (
        f"{'model':<6} {'P':>7} {'N':>6} {'procs':>5} {'1 HVP ms':>9} {'speed-up':>8} {'eff.':>5} "
        f"{'K HVPs ms':>10} {'per HVP':>8} {'speed-up':>8} {'eff.':>5}"
    )
    print(header)
    print("-" * len(header))
    base = counts[0]
    for model in args.models.split(","):
        ref = runs[base][model]
        for n in counts:
            r = runs[n][model]
            s1 = ref["single_s"] / r["single_s"] * base
            sk = ref["block_s"] / r["block_s"] * base
            print(
                f"{model:<6} {r['params']:>7,} {r['samples']:>6,} {n:>5} {1e3 * r['single_s']:>9.1f} {s1:>8.2f} "
                f"{s1 / n:>5.2f} {1e3 * r['block_s']:>10.1f} {1e3 * r['block_s'] / args.k:>8.2f} {sk:>8.2f} "
                f"{sk / n:>5.2f}"
            )


if __name__ == "__main__":
    main()
