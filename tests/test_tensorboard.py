"""``train --tensorboard DIR``: the run's curves as TensorBoard events in DIR/RUN, written once
training ends; a missing package or a folder of other files is one line before training.

TensorBoard is an optional extra that CI does not install: its writer is replaced here by
a recorder with the same two methods, so what is written (tags, values, steps) is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cli.helpers import invoke_main, one_line_error  # tests/cli/helpers.py

import flatcli.workflows.tensorboard as tensorboard
from flatcli.errors import UsageError
from flatcli.workflows.tensorboard import EVENT_PREFIX, SCALARS, write_tensorboard
from flatcli.workflows.training import EpochRecord

HISTORY = [
    EpochRecord(
        epoch=e,
        lr=0.1,
        train_loss=1.0 / e,
        train_accuracy=0.5 + e / 10,
        test_loss=1.5 / e,
        test_accuracy=0.4 + e / 10,
        seconds=2.0,
    )
    for e in (1, 2, 3)
]


class Recorder:
    """A stand-in for ``SummaryWriter``: records the scalars, writes one event file."""

    written: list[tuple[str, str, float, int]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        Recorder.written.append((Path(self.log_dir).name, tag, scalar_value, global_step))

    def close(self) -> None:
        (Path(self.log_dir) / f"{EVENT_PREFIX}fake").write_text("events")


@pytest.fixture
def recorder(monkeypatch):
    Recorder.written = []
    monkeypatch.setattr(tensorboard, "_writer_class", lambda: Recorder)
    return Recorder


def test_every_epoch_is_written_with_each_tag_at_its_epoch(tmp_path, recorder):
    where = write_tensorboard(tmp_path / "tb", "run1", HISTORY)
    assert where == tmp_path / "tb" / "run1"
    assert [p.name for p in where.iterdir()] == [f"{EVENT_PREFIX}fake"]
    scalars = {(tag, step): value for _, tag, value, step in recorder.written}
    assert len(recorder.written) == len(SCALARS) * 3
    assert scalars[("accuracy/test", 2)] == pytest.approx(0.6)
    assert scalars[("loss/train", 3)] == pytest.approx(1 / 3)
    assert scalars[("lr", 1)] == 0.1
    assert list(where.parent.iterdir()) == [where]  # no staging folder left


def test_a_rerun_replaces_the_old_events_of_the_run_and_nothing_else(tmp_path, recorder):
    old = tmp_path / "tb" / "run1"
    old.mkdir(parents=True)
    (old / f"{EVENT_PREFIX}old").write_text("old")
    other = tmp_path / "tb" / "run2"
    other.mkdir()
    (other / f"{EVENT_PREFIX}keep").write_text("keep")
    write_tensorboard(tmp_path / "tb", "run1", HISTORY)
    assert [p.name for p in old.iterdir()] == [f"{EVENT_PREFIX}fake"]
    assert (other / f"{EVENT_PREFIX}keep").read_text() == "keep"


def test_a_run_folder_of_other_files_is_refused_and_kept(tmp_path, recorder):
    target = tmp_path / "tb" / "run1"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not TensorBoard events: notes.txt"):
        write_tensorboard(tmp_path / "tb", "run1", HISTORY)
    assert (target / "notes.txt").read_text() == "mine" and recorder.written == []


def test_train_writes_its_events_after_training(tmp_path, recorder):
    result = invoke_main(
        "train", "--epochs", 2, "--train-samples", 100, "--out", tmp_path / "run1",
        "--tensorboard", tmp_path / "tb",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert f"tensorboard events: {tmp_path / 'tb' / 'run1'}" in result.stderr
    assert sorted({step for _, _, _, step in recorder.written}) == [1, 2]
    assert [p.name for p in (tmp_path / "tb" / "run1").iterdir()] == [f"{EVENT_PREFIX}fake"]


def test_without_tensorboard_train_says_so_in_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = invoke_main(
        "train", "--epochs", 1, "--out", tmp_path / "run", "--tensorboard", tmp_path
    )
    one_line_error(result, 2, "--tensorboard needs the tensorboard package", "flatcli[tensorboard]")
    assert not (tmp_path / "run").exists()


def test_a_file_as_the_tensorboard_folder_is_refused_before_training(tmp_path, recorder):
    (tmp_path / "tb").write_text("")
    result = invoke_main(
        "train", "--epochs", 1, "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb"
    )
    one_line_error(result, 2, "is a file")
    assert not (tmp_path / "run").exists()
