"""Run folders never lose a user's files: validation first, staged overwrite, locks, resume options."""

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest
import torch
from cli.helpers import invoke_main  # tests/cli/helpers.py
from safetensors import SafetensorError
from safetensors.torch import save_file
from typer.testing import CliRunner

import flatcli.workflows.checkpoint as ckpt
from flatcli import build_model, load_checkpoint, save_checkpoint, train
from flatcli.cli import app
from flatcli.distributed import resolve_device
from flatcli.errors import (
    CheckpointError,
    DataError,
    OutputError,
    RunExistsError,
    UnknownNameError,
    UsageError,
)
from flatcli.workflows.checkpoint import LOCK_FILE, STAGING_DIR, load_state_file, save_state
from flatcli.workflows.training import TrainCallbacks

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


class Interrupt(Exception):
    pass


def stop_at(epoch):
    def on_epoch(record):
        if record.epoch == epoch:
            raise Interrupt

    return TrainCallbacks(on_epoch=on_epoch)


@pytest.fixture
def old_run(make_config):
    train(make_config(out=Path("run"), epochs=1))
    Path("run/sharpness.json").write_text('{"entries": {}}')
    return snapshot("run")


# --- 1. --overwrite: validate first, only flatcli's files, atomic replacement ------------


@pytest.mark.parametrize(
    "bad, error",
    [
        (dict(optimizer="sgdd"), UnknownNameError),
        (dict(schedule="cosin"), UnknownNameError),
        (dict(model="mlp", model_kwargs={"width": 0}), UsageError),
        (dict(dataset="mnist", data_dir="missing"), Exception),
        (dict(device="mps"), UsageError),
    ],
)
def test_overwrite_with_a_bad_option_keeps_the_old_run(old_run, make_config, bad, error):
    with pytest.raises(error):
        train(make_config(out=Path("run"), epochs=1, overwrite=True, **bad))
    assert snapshot("run") == old_run


@pytest.mark.parametrize(
    "args, code",
    [
        (["--optimizer", "sgdd"], 2),
        (["--schedule", "cosin"], 2),
        (["--model", "mlp", "--width", "0"], 2),
    ],
)
def test_overwrite_with_a_typo_through_the_cli_is_one_line_and_keeps_the_run(old_run, args, code):
    # through the console script's main(): the parser's own errors are one line there
    one_line(invoke_main("train", "--out", "run", "--overwrite", "--epochs", 1, *args), code)
    assert snapshot("run") == old_run


def test_overwrite_refuses_a_folder_with_files_that_are_not_a_runs(old_run, make_config):
    Path("run/thesis.tex").write_text("years of work")
    with pytest.raises(RunExistsError, match="thesis.tex"):
        train(make_config(out=Path("run"), epochs=1, overwrite=True))
    assert Path("run/thesis.tex").read_text() == "years of work"
    notes = Path("notes")
    notes.mkdir()
    (notes / "todo.md").write_text("x")
    line = one_line(invoke("train", "--out", "notes", "--overwrite", "--epochs", 1), 1)
    assert "todo.md" in line and (notes / "todo.md").read_text() == "x"


def test_out_dot_in_a_folder_with_other_files_is_refused(make_config, monkeypatch):
    home = Path("home")
    home.mkdir()
    (home / "a.txt").write_text("a")
    (home / "sub").mkdir()
    monkeypatch.chdir(home)
    line = one_line(invoke("train", "--out", ".", "--overwrite", "--epochs", 1), 1)
    assert "a.txt" in line and "sub" in line
    assert sorted(p.name for p in Path(".").iterdir()) == ["a.txt", "sub"]


def test_overwrite_replaces_exactly_the_old_runs_files(make_config):
    train(make_config(out=Path("run"), epochs=2, average_from=1))  # has last.safetensors
    Path("run/sharpness.json").write_text("{}")
    old = Path("run/model.safetensors").read_bytes()
    result = train(make_config(out=Path("run"), epochs=1, seed=5, overwrite=True))
    assert result.checkpoint == Path("run/model.safetensors")
    assert sorted(p.name for p in Path("run").iterdir()) == [
        "metrics.csv",
        "metrics.jsonl",
        "model.safetensors",
    ]
    assert Path("run/model.safetensors").read_bytes() != old
    assert load_checkpoint("run")[1].train["seed"] == 5


def test_an_interrupted_overwrite_keeps_the_old_run_whole(old_run, make_config):
    with pytest.raises(Interrupt):
        train(make_config(out=Path("run"), epochs=2, seed=5, overwrite=True), stop_at(1))
    assert snapshot("run") == old_run  # no staging folder, no resume state, nothing replaced
    with pytest.raises(KeyboardInterrupt):

        def ctrl_c(record):
            raise KeyboardInterrupt

        train(
            make_config(out=Path("run"), epochs=2, overwrite=True), TrainCallbacks(on_epoch=ctrl_c)
        )
    assert snapshot("run") == old_run


def test_a_staging_folder_left_by_a_kill_is_discarded(old_run, make_config):
    # SIGKILL during a staged overwrite: the old run is complete, the staging folder stale.
    (Path("run") / STAGING_DIR).mkdir()
    (Path("run") / STAGING_DIR / "resume.safetensors").write_bytes(b"stale")
    with pytest.raises(
        RunExistsError, match="already complete"
    ):  # --resume continues the old run, if any
        train(make_config(out=Path("run"), epochs=1, resume=True))
    train(make_config(out=Path("run"), epochs=1, seed=2, overwrite=True))
    assert not (Path("run") / STAGING_DIR).exists()
    assert load_checkpoint("run")[1].train["seed"] == 2


def test_a_partial_old_run_is_resumed_after_a_killed_overwrite(make_config):
    with pytest.raises(Interrupt):
        train(make_config(out=Path("part"), epochs=2), stop_at(1))
    (Path("part") / STAGING_DIR).mkdir()
    (Path("part") / STAGING_DIR / "metrics.jsonl").write_text("stale")
    train(make_config(out=Path("part"), epochs=2, resume=True))
    assert sorted(p.name for p in Path("part").iterdir()) == [
        "metrics.csv",
        "metrics.jsonl",
        "model.safetensors",
    ]


# --- 2. one process per run folder -------------------------------------------------------


def test_a_run_folder_is_locked_while_training(old_run, make_config):
    fd = os.open("run/" + LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(RunExistsError, match="in use"):
            train(make_config(out=Path("run"), epochs=1, seed=4, overwrite=True))
        line = one_line(invoke("train", "--out", "run", "--overwrite", "--epochs", 1), 1)
        assert "in use" in line
        assert {k: v for k, v in snapshot("run").items() if k != LOCK_FILE} == old_run
    finally:
        os.close(fd)
    seen = []

    def on_epoch(record):  # while training, the lock is held
        probe = os.open("run/" + LOCK_FILE, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(record.epoch)
        finally:
            os.close(probe)

    train(make_config(out=Path("run"), epochs=1, overwrite=True), TrainCallbacks(on_epoch=on_epoch))
    assert seen == [1] and not Path("run/" + LOCK_FILE).exists()  # released and removed


def test_the_lock_is_released_when_training_fails(make_config):
    with pytest.raises(Interrupt):
        train(make_config(out=Path("run"), epochs=2), stop_at(1))
    train(
        make_config(out=Path("run"), epochs=2, resume=True)
    )  # would say "in use" if the lock had leaked


# --- 3. a failed train leaves no folder it created ---------------------------------------


def test_a_failed_train_leaves_no_folder_it_created(make_config):
    def crash(start, epochs, batches):
        raise RuntimeError("crash at start")

    with pytest.raises(RuntimeError):
        train(make_config(out=Path("a/b/run"), epochs=1), TrainCallbacks(on_start=crash))
    assert not Path("a").exists()
    with pytest.raises(DataError, match="mnist not found in missing"):
        train(make_config(out=Path("c/run"), dataset="mnist", data_dir="missing"))
    assert not Path("c").exists()
    Path("empty").mkdir()  # a folder that was there stays
    with pytest.raises(RuntimeError):
        train(make_config(out=Path("empty"), epochs=1), TrainCallbacks(on_start=crash))
    assert Path("empty").is_dir() and not any(Path("empty").iterdir())
    result = invoke("train", "--out", "d/run", "--dataset", "mnist", "--data-dir", "missing")
    one_line(result, 1)
    assert not Path("d").exists()


# --- 4. --resume continues the run with its own options ----------------------------------

RUN = dict(model="mlp", model_kwargs={"width": 8}, lr=0.1, seed=3, epochs=3)


@pytest.fixture
def part(make_config):
    with pytest.raises(Interrupt):
        train(make_config(out=Path("part"), **RUN), stop_at(2))
    return Path("part")


def test_resume_alone_continues_with_the_runs_options(fixed_provenance, part, make_config):
    train(make_config(out=Path("full"), **RUN))
    result = invoke("train", "--out", "part", "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    info = load_checkpoint("part")[1]
    assert (info.train["lr"], info.train["seed"], info.train["model_kwargs"]["width"]) == (
        0.1,
        3,
        8,
    )
    assert (
        Path("part/model.safetensors").read_bytes() == Path("full/model.safetensors").read_bytes()
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "0.5"], "--lr 0.5 contradicts the run's lr 0.1"),
        (["--seed", "1"], "--seed 1 contradicts the run's seed 3"),
        (["--model", "logreg"], "--model logreg contradicts the run's model mlp"),
        (["--width", "16"], "--width 16 contradicts the run's width 8"),
        (["--optimizer", "adam"], "--optimizer adam contradicts the run's optimizer sgd"),
        (["--dataset", "mnist"], "--dataset mnist contradicts the run's dataset digits"),
        (["--epochs", "1"], "--epochs 1 is fewer than the 2 epochs"),
        (["--overwrite"], "--overwrite and --resume contradict each other"),
    ],
)
def test_resume_refuses_options_that_contradict_the_run(part, args, message):
    before = snapshot(part)
    line = one_line(invoke("train", "--out", "part", "--resume", *args), 2)
    assert message in line
    assert snapshot(part) == before


def test_resume_through_the_library_checks_the_options_too(part, make_config):
    with pytest.raises(UsageError, match="--lr 0.5 contradicts the run's lr 0.1"):
        train(make_config(out=part, resume=True, **{**RUN, "lr": 0.5}))
    with pytest.raises(UsageError, match="--model logreg contradicts"):
        train(make_config(out=part, resume=True, **{**RUN, "model": "logreg", "model_kwargs": {}}))


def test_resume_may_grow_the_epochs_unless_the_schedule_depends_on_them(part, make_config):
    result = invoke("train", "--out", "part", "--resume", "--epochs", 4, "--json")
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint("part")[1].train["epochs"] == 4
    assert len(Path("part/metrics.jsonl").read_text().splitlines()) == 4
    with pytest.raises(Interrupt):
        train(make_config(out=Path("cos"), schedule="cosine", **RUN), stop_at(2))
    line = one_line(invoke("train", "--out", "cos", "--resume", "--epochs", 5), 2)
    assert "--epochs 5 contradicts the run's epochs 3" in line and "cosine" in line


def test_a_state_without_options_and_another_model_is_one_line(part, make_config):
    state = load_state_file(part / "resume.safetensors")
    state.pop("options")  # as saved by an older flatcli
    save_state(part / "resume.safetensors", state)
    with pytest.raises(CheckpointError, match="does not match"):
        train(make_config(out=part, resume=True, model="logreg", epochs=3))
    line = one_line(
        invoke("train", "--out", "part", "--resume", "--model", "cnn", "--epochs", 3), 1
    )
    assert "does not match" in line


# --- 5, 6. temporaries and file modes ------------------------------------------------------


def test_orphaned_temporaries_are_removed_when_a_run_resumes_or_ends(part, make_config):
    orphans = [part / ".resume.safetensors.k1ll3d.tmp", part / ".model.safetensors.x.tmp"]
    for p in orphans:
        p.write_bytes(b"half")
    train(make_config(out=part, resume=True, **RUN))
    assert not any(p.exists() for p in orphans)

    def leave_orphan(record):
        Path("fresh/.metrics.jsonl.abc.tmp").write_text("half")

    train(make_config(out=Path("fresh"), epochs=1), TrainCallbacks(on_epoch=leave_orphan))
    assert sorted(p.name for p in Path("fresh").iterdir()) == [
        "metrics.csv",
        "metrics.jsonl",
        "model.safetensors",
    ]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_respect_the_umask(make_config, umask, mode):
    old = os.umask(umask)
    try:
        train(make_config(out=Path("run"), epochs=1))
    finally:
        os.umask(old)
    for p in Path("run").iterdir():
        assert p.stat().st_mode & 0o777 == mode, p


# --- 7. unwritable folders and a full disk -----------------------------------------------


def test_a_full_disk_during_train_is_one_line_and_keeps_the_old_run(
    old_run, make_config, monkeypatch
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OutputError, match="No space left on device"):
        train(make_config(out=Path("run"), epochs=1, seed=9, overwrite=True))
    assert snapshot("run") == old_run

    def full_as_safetensors_says(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(ckpt, "save_file", full_as_safetensors_says)
    line = one_line(invoke("train", "--out", "new", "--epochs", 1), 1)
    assert "No space left" in line and not Path("new").exists()


def test_out_under_a_read_only_folder_is_one_line(make_config, monkeypatch):
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if "locked" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(OutputError, match="Permission denied"):
        train(make_config(out=Path("locked/run"), epochs=1))
    line = one_line(invoke("train", "--out", "locked/run", "--epochs", 1), 1)
    assert "locked/run" in line and "Permission denied" in line


def test_a_read_only_run_folder_is_one_line_and_keeps_the_run(old_run, make_config, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # as on a read-only mount (root ignores chmod)
        if str(path).startswith("run") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputError, match="Read-only file system"):
        train(make_config(out=Path("run"), epochs=1, overwrite=True))
    line = one_line(invoke("train", "--out", "run", "--overwrite", "--epochs", 1), 1)
    assert "run" in line and "not writable" in line
    assert snapshot("run") == old_run


# --- 8. checkpoint metadata of the wrong types -------------------------------------------


def _logreg_file(tmp_path, doc):
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    path = tmp_path / "m.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"flatcli": json.dumps(doc)},
    )
    return path


GOOD = {
    "format_version": 1,
    "arch": {"name": "logreg", "kwargs": {}},
    "dataset": {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]},
    "train": {"l2": 0.0},
}


@pytest.mark.parametrize(
    "doc, message",
    [
        (["a", "list"], "list"),
        ({**GOOD, "arch": "logreg"}, "arch"),
        ({**GOOD, "dataset": {**GOOD["dataset"], "num_classes": "ten"}}, "num_classes"),
        ({**GOOD, "dataset": {**GOOD["dataset"], "input_shape": "1x8x8"}}, "input_shape"),
        ({**GOOD, "train": {"l2": "lots"}}, "l2"),
        ({**GOOD, "train": ["l2"]}, "train"),
        ({**GOOD, "metrics": {"test_accuracy": "high"}}, "test_accuracy"),
        ({**GOOD, "arch": {"name": "logreg", "kwargs": {"bias": "maybe"}}}, "bias"),
        ({**GOOD, "format_version": 99}, "upgrade flatcli"),
        ({**GOOD, "format_version": "1"}, "format_version"),
    ],
)
def test_metadata_of_the_wrong_types_is_a_checkpoint_error(tmp_path, doc, message):
    path = _logreg_file(tmp_path, doc)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    result = invoke("sharpness", path, "--measures", "lambda_max")
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_good_metadata_still_loads(tmp_path):
    load_checkpoint(_logreg_file(tmp_path, GOOD))


def test_integer_tensors_for_floating_point_weights_are_refused(tmp_path):
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    meta = {k: GOOD[k] for k in ("arch", "dataset")}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = next(iter(tensors))
    tensors[name] = tensors[name].round().to(torch.int64)
    save_file(tensors, str(tmp_path / "int.safetensors"), metadata={"flatcli": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=f"wrong dtype {name} int64 vs float32"):
        load_checkpoint(tmp_path / "int.safetensors")
    # BatchNorm's step counter is int64 in the model itself: a BN model round-trips
    bn = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, batchnorm=True, channels=2)
    save_checkpoint(
        tmp_path / "bn.safetensors",
        bn,
        {
            "arch": {"name": "cnn", "kwargs": {"batchnorm": True, "channels": 2}},
            "dataset": GOOD["dataset"],
        },
    )
    load_checkpoint(tmp_path / "bn.safetensors")


# --- 9. devices that are not there ---------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mps", "nonsense", f"cuda:{torch.cuda.device_count()}"]
)  # one past the last GPU
def test_an_unavailable_device_is_a_usage_error(name):
    with pytest.raises(UsageError):
        resolve_device(name)
    one_line(invoke("train", "--out", "run", "--device", name, "--epochs", 1), 2)
    assert not Path("run").exists()
