"""Data-parallel ``flatcli train`` under torchrun: N processes train the one-process recipe.

Two CPU processes (gloo, one thread each) are launched as a user would, with
``python -m torch.distributed.run --nproc-per-node 2 ... -m flatcli train``. The run
below has 1,437 training images in global batches of 64, so the last batch (29 images)
splits unevenly, 15 and 14: the loss weighting must still give the global batch mean's
gradient.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_helpers import env as _env
from torchrun_helpers import free_port as _free_port
from torchrun_helpers import torchrun
from typer.testing import CliRunner

from flatcli import distributed, load_checkpoint, load_dataset
from flatcli.cli import app
from flatcli.config import make_train_config
from flatcli.distributed import World
from flatcli.errors import UsageError
from flatcli.workflows.checkpoint import load_state_file
from flatcli.workflows.data import augment_batch
from flatcli.workflows.training import TrainCallbacks, evaluate, train

runner = CliRunner()
RUN = [
    "--model",
    "mlp",
    "--width",
    "16",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--seed",
    "1",
    "--device",
    "cpu",
]
LIBRARY_RUN = dict(
    dataset="digits",
    model="mlp",
    model_kwargs={"width": 16},
    epochs=3,
    batch_size=64,
    seed=1,
    device="cpu",
)
TIMEOUT_S = 180  # a hang fails the test instead of the suite


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def two_ranks(*args) -> list[tuple[int, str]]:
    """Two ranks started directly (the environment torchrun sets), to see each one's exit code and stderr."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flatcli", "--threads", "1", *map(str, args)],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = []
    for p in procs:
        try:
            _, stderr = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung")
        results.append((p.returncode, stderr))
    return results


def assert_same_model(a: Path, b: Path, atol: float = 1e-5) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb) and not any(k.startswith("module.") for k in tb)
    for key in ta:
        assert torch.allclose(ta[key].double(), tb[key].double(), atol=atol, rtol=1e-4), key


def assert_same_metrics(one: dict, two: dict) -> None:
    for key in ("train_loss", "test_loss", "weight_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    for key in ("train_accuracy", "test_accuracy"):
        assert two[key] == pytest.approx(one[key], abs=2 / 360), key  # a near-tie may flip


# --- the recipe ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--average-from", "2", "--l2", "1e-3", "--weight-decay", "1e-2", "--schedule", "cosine"],
    ],
    ids=["plain", "averaged-regularised-scheduled"],
)
def test_two_processes_end_where_one_process_ends(extra):
    one = invoke("train", *RUN, *extra, "--out", "one", "--json")
    assert one.exit_code == 0, one.stderr
    two = torchrun("train", *RUN, *extra, "--out", "two", "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    one_doc, two_doc = (
        json.loads(one.stdout),
        json.loads(two.stdout),
    )  # rank 0 alone prints the document
    assert_same_metrics(one_doc, two_doc)
    assert_same_model(
        Path("one/model.safetensors"), Path("two/model.safetensors")
    )  # no `module.` prefix
    if extra:
        assert_same_model(Path("one/last.safetensors"), Path("two/last.safetensors"))
    history = [json.loads(line) for line in Path("two/metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in Path("one/metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in history] == pytest.approx(
        [r["train_loss"] for r in reference], rel=1e-5
    )
    assert sorted(p.name for p in Path("two").iterdir()) == sorted(
        p.name for p in Path("one").iterdir()
    )

    measured = [
        invoke("sharpness", run, "--measures", "lambda_max", "--json") for run in ("one", "two")
    ]
    assert all(m.exit_code == 0 for m in measured), measured[1].stderr
    one_lmax, two_lmax = (json.loads(m.stdout)["lambda_max"]["value"] for m in measured)
    assert two_lmax == pytest.approx(one_lmax, rel=1e-3)


# --- resume with any number of processes ---------------------------------------------


@pytest.fixture
def reference() -> dict:
    """The uninterrupted one-process run, in ``full``."""
    full = invoke("train", *RUN, "--out", "full", "--json")
    assert full.exit_code == 0, full.stderr
    return json.loads(full.stdout)


def test_a_two_process_run_resumes_with_one_process(reference):
    # 2 processes; rank 1 fails in epoch 3 (all-reduce 5: two per epoch), after epoch 2 was saved
    broken = torchrun("train", *RUN, "--out", "two", FLATCLI_TEST_FAIL="1:5:raise")
    assert broken.returncode != 0 and "test fault on rank 1" in broken.stderr
    assert load_state_file(Path("two/resume.safetensors"), tensors=False)["epoch"] == 2
    resumed = invoke("train", "--out", "two", "--resume", "--json")  # by 1 process
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_metrics(reference, json.loads(resumed.stdout))
    assert_same_model(Path("full/model.safetensors"), Path("two/model.safetensors"))


def test_a_one_process_run_resumes_with_two_processes(reference):
    class Interrupt(Exception):
        pass

    def stop_after_one(record):
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):  # 1 process, interrupted after epoch 1
        train(make_train_config(**LIBRARY_RUN, out="one"), TrainCallbacks(on_epoch=stop_after_one))
    resumed = torchrun("train", "--out", "one", "--resume", "--json")  # by 2 processes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(reference, json.loads(resumed.stdout))
    assert_same_model(Path("full/model.safetensors"), Path("one/model.safetensors"))
    assert not Path("one/resume.safetensors").exists()


# --- refusals end every rank ----------------------------------------------------------


def test_a_refusal_on_rank_0_ends_every_rank_with_one_line():
    assert invoke("train", "--epochs", "1", "--device", "cpu", "--out", "run").exit_code == 0
    before = {p.name: p.read_bytes() for p in Path("run").iterdir()}
    results = two_ranks("train", "--epochs", "1", "--device", "cpu", "--out", "run")
    for code, stderr in results:
        lines = stderr.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "already holds a run" in lines[0], stderr
    assert {p.name: p.read_bytes() for p in Path("run").iterdir()} == before


def test_sync_bn_with_several_cpu_processes_is_refused_before_the_folder_is_touched(monkeypatch):

    monkeypatch.setattr(distributed, "init", lambda *args, **kwargs: World(0, 2))  # as rank 0 of 2
    with pytest.raises(UsageError, match="--sync-bn needs CUDA"):
        train(make_train_config(**LIBRARY_RUN, sync_bn=True, out="run"))
    assert not Path("run").exists()


def test_sync_bn_changes_nothing_for_one_process():
    cnn = {**LIBRARY_RUN, "epochs": 1, "model": "cnn", "model_kwargs": {"batchnorm": True}}
    train(make_train_config(**cnn, out="a"))
    train(make_train_config(**cnn, sync_bn=True, out="b"))
    a, b = load_file("a/model.safetensors"), load_file("b/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the parts of a batch ----------------------------------------------------------------


def test_each_rank_augments_its_part_as_one_process_augments_the_batch():
    x = torch.randn(7, 3, 8, 8)
    whole = augment_batch(x, torch.Generator().manual_seed(5))
    parts = []
    for rank in range(2):
        rows = World(rank, 2).shard(7)  # 4 and 3 images
        generator = torch.Generator().manual_seed(5)
        parts.append(augment_batch(x[rows], generator, part=(7, rows)))
        assert (
            generator.initial_seed() == 5
            and torch.equal(  # every rank's generator stays in step
                generator.get_state(), _after_whole_batch(x)
            )
        )
    assert torch.equal(torch.cat(parts), whole)


def _after_whole_batch(x: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    augment_batch(x, generator)
    return generator.get_state()


@pytest.mark.slow
def test_batchnorm_ranks_save_the_model_they_evaluated():
    """Per-rank BatchNorm statistics: rank 0's are kept, so the saved model is the one whose metrics are reported."""

    args = [
        "--model",
        "cnn",
        "--batchnorm",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--average-from",
        "2",
        "--device",
        "cpu",
    ]
    two = torchrun("train", *args, "--out", "bn", "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    doc = json.loads(two.stdout)
    model, _ = load_checkpoint("bn")
    x, y = load_dataset("digits", split="train").tensors
    loss, accuracy = evaluate(model, x, y)
    assert loss == pytest.approx(doc["train_loss"], rel=1e-5) and accuracy == pytest.approx(
        doc["train_accuracy"]
    )
