"""Data-parallel curvature under torchrun: N processes measure what one process measures.

Each process takes a contiguous shard of the measured samples; every data pass adds the
shard sums, weighted by the GLOBAL sample count, over the processes (all_reduce), and the
estimators run identically everywhere (same seeds, probes drawn on the CPU). So
``flatcli sharpness`` under ``torchrun --nproc-per-node 2`` must give the one-process
numbers up to float rounding, print one JSON document (rank 0) and write one cache entry.
A process that dies makes the other exit non-zero with one line, never hang.

Two CPU processes (gloo, one thread each) on the digits MLP of width 16 (1,437 images).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from torchrun_helpers import env as _env
from torchrun_helpers import free_port as _free_port
from torchrun_helpers import torchrun

from flatcli.config import SharpnessConfig, make_train_config
from flatcli.distributed import (
    DistributedError,
    World,
    configured_timeout,
    main_decides,
    main_first,
)
from flatcli.errors import RunExistsError
from flatcli.workflows.sharpness import sharpness
from flatcli.workflows.training import train

TIMEOUT_S = 240  # a hang fails the test instead of the suite


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:

    out = tmp_path_factory.mktemp("dist") / "RUN"
    train(
        make_train_config(
            dataset="digits",
            model="mlp",
            model_kwargs={"width": 16},
            epochs=2,
            device="cpu",
            out=str(out),
        )
    )
    return out


def one_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flatcli", "--threads", "1", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
    )


def json_of(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)  # exactly one document: a second one would not parse


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


# --- shards and settings (no processes) ---------------------------------------------------


@pytest.mark.parametrize(
    "n, size, batch",
    [
        (1437, 2, None),
        (1437, 3, None),
        (10, 4, None),
        (1437, 2, 100),
        (1437, 4, 1024),
        (1437, 2, 1024),
        (3, 4, None),
    ],
)
def test_shards_cover_every_sample_once_in_order_on_whole_batches(n, size, batch):
    shards = [World(r, size, r).data_shard(n, batch) for r in range(size)]
    covered = [i for s in shards for i in range(n)[s]]
    whole = (batch is not None and -(-n // batch) < size) or n < size
    if (
        whole
    ):  # fewer samples (batches) than processes: every process takes all, weighted by size * n
        assert all(s == slice(0, n) for s in shards)
        return
    assert covered == list(range(n))
    if (
        batch is not None
    ):  # a shard starts on a one-process batch boundary: per-batch statistics unchanged
        assert all(s.start % batch == 0 for s in shards)
    unit = batch or 1
    parts = [-(-(s.stop - s.start) // unit) for s in shards]  # samples, or batches
    assert max(parts) - min(parts) <= 1


def test_with_one_process_rank_0_decides_alone_and_its_error_is_raised_as_is():
    calls = []
    assert main_decides(lambda: calls.append("decided") or {"mode": "fresh"}) == {"mode": "fresh"}
    assert main_first(World(), lambda: calls.append("first") or 7) == 7
    assert calls == ["decided", "first"]
    refusal = RunExistsError("runs/x already holds a run", hint="pass --overwrite")

    def refuse() -> None:
        raise refusal

    with pytest.raises(RunExistsError) as caught:
        main_decides(refuse)
    assert caught.value is refusal


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLATCLI_DIST_TIMEOUT", "12.5")
    assert configured_timeout() == 12.5
    monkeypatch.setenv("FLATCLI_DIST_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="FLATCLI_DIST_TIMEOUT"):
        configured_timeout()


# --- two processes --------------------------------------------------------------------------


def test_two_processes_measure_what_one_measures_and_rank_0_alone_writes(run_dir):

    two = json_of(
        torchrun(
            "sharpness",
            run_dir,
            "--measures",
            "lambda_max,trace,density",
            "--dtype",
            "float64",
            "--json",
        )
    )
    assert two["cached"] is False and two["hvps"] > 0 and two["num_samples"] == 1437
    entries = json.loads((run_dir / "sharpness.json").read_text())["entries"]
    assert len(entries) == 1  # written once, by rank 0

    one = sharpness(
        run_dir,
        SharpnessConfig(measures=("lambda_max", "trace", "density"), dtype="float64"),
        device="cpu",
        use_cache=False,
    ).as_dict()  # one process, here
    # the one-process result has the same cache key: the digest is of all the data measured
    assert json.loads((run_dir / "sharpness.json").read_text())["entries"].keys() == entries.keys()
    for name in ("lambda_max", "trace"):
        assert close(two[name]["value"], one[name]["value"]), name
    assert close(two["split_loss"], one["split_loss"], 1e-10)
    assert two["split_accuracy"] == one["split_accuracy"]
    peak = max(one["density"]["values"])
    assert all(
        abs(a - b) <= 1e-6 * peak
        for a, b in zip(two["density"]["values"], one["density"]["values"], strict=True)
    )
    assert two["density"]["grid"] == pytest.approx(one["density"]["grid"], rel=1e-6)


@pytest.mark.slow
def test_rank_bound_and_compare_under_two_processes_agree_with_one(run_dir, tmp_path):

    two_rank = json_of(torchrun("rank-bound", run_dir, "--json"))
    one_rank = json_of(one_process("rank-bound", run_dir, "--json"))
    assert two_rank["exact"] is True  # dense float64 Hessian and GGN, 1,210 parameters
    for key in (
        "num_samples",
        "paper_bound",
        "data_bound",
        "numerical_rank",
        "ggn_rank",
        "effective_rank",
        "ggn_effective_rank",
        "statement",
    ):
        assert two_rank[key] == one_rank[key], key

    other = tmp_path / "OTHER"
    train(
        make_train_config(
            dataset="digits",
            model="mlp",
            model_kwargs={"width": 16},
            epochs=2,
            l2=5e-3,
            device="cpu",
            out=str(other),
        )
    )
    args = (
        "compare",
        run_dir,
        other,
        "--measures",
        "lambda_max,trace",
        "--dtype",
        "float64",
        "--no-cache",
        "--json",
    )
    two = json_of(torchrun(*args))
    one = json_of(one_process(*args))
    for a, b in zip(two["runs"], one["runs"], strict=True):
        for name in ("lambda_max", "trace"):
            assert close(a[name]["value"], b[name]["value"]), name
    assert [(v["measure"], v["agrees"], v["sharpness_tie"]) for v in two["verdicts"]] == [
        (v["measure"], v["agrees"], v["sharpness_tie"]) for v in one["verdicts"]
    ]


def two_ranks(*args, **env) -> list[tuple[int, str, float]]:
    """Two flatcli processes with the environment torchrun gives them, but no torchrun agent
    (which would kill the survivor itself): the test hosts the rendezvous store, as the agent
    does (TORCHELASTIC_USE_AGENT_STORE), so that neither process depends on the other's start-up
    time. Returns each process's exit code, stderr and seconds.
    """

    port = _free_port()
    store = dist.TCPStore(
        "127.0.0.1", port, 2, True, timedelta(seconds=TIMEOUT_S), wait_for_workers=False
    )
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flatcli", "--threads", "1", *map(str, args)],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                TORCHELASTIC_USE_AGENT_STORE="True",
                **env,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = []
    try:
        for p in procs:
            _, stderr = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, stderr, time.monotonic() - start))
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        pytest.fail("a process hung")
    finally:
        del store
    return results


@pytest.mark.parametrize("how", ["exit", pytest.param("raise", marks=pytest.mark.slow)])
def test_a_process_that_dies_mid_run_makes_the_other_exit_with_one_line(run_dir, how):
    # rank 1 dies (os._exit, as when killed) or fails (a FlatcliError) at its 3rd all-reduce:
    # the global count, the loss, then the first Hessian-vector product
    (code0, err0, _), (code1, err1, _) = two_ranks(
        "sharpness",
        run_dir,
        "--measures",
        "lambda_max",
        "--no-cache",
        "--json",
        FLATCLI_TEST_FAIL=f"1:3:{how}",
    )
    assert code1 != 0 and code0 == 1
    lines = [line for line in err0.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: another process of this run failed"), (
        err0
    )
    if how == "raise":  # the failing rank says why, under its rank
        assert "error: rank 1: test fault" in err1


@pytest.mark.slow
@pytest.mark.parametrize(
    "bn", [["--bn-mode", "batch", "--batch-size", "100"], ["--bn-mode", "full"]]
)
def test_batch_statistics_are_those_of_one_process(tmp_path, bn):
    # batch statistics: each shard is whole one-process batches (5 of 100 -> 3 + 2), so every batch is
    # normalised as with one process; full: every process takes all 500 (the statistics of the set)

    run = tmp_path / "BN"
    train(
        make_train_config(
            dataset="digits",
            model="cnn",
            model_kwargs={"batchnorm": True, "channels": 4},
            epochs=1,
            train_samples=600,
            device="cpu",
            out=str(run),
        )
    )
    args = [
        "--measures",
        "lambda_max,trace",
        "--probes",
        "20",
        "--dtype",
        "float64",
        "--samples",
        "500",
        *bn,
    ]
    two = json_of(torchrun("sharpness", run, *args, "--json", "--no-cache"))
    mode = bn[1]
    one = sharpness(
        run,
        SharpnessConfig(
            measures=("lambda_max", "trace"),
            probes=20,
            dtype="float64",
            samples=500,
            bn_mode=mode,
            batch_size=100 if mode == "batch" else None,
        ),
        device="cpu",
        use_cache=False,
    ).as_dict()
    for name in ("lambda_max", "trace"):
        assert close(two[name]["value"], one[name]["value"]), name
    assert close(two["split_loss"], one["split_loss"], 1e-10)
    assert (
        two["num_samples"] == one["num_samples"] == 500
        and two["bn_batch_size"] == one["bn_batch_size"]
    )
