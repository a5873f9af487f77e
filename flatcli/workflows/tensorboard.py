"""A run's training curves as TensorBoard event files (the optional extra ``flatcli[tensorboard]``).

``train --tensorboard DIR`` writes ``DIR/RUN`` (``RUN`` the run folder's name), the layout
``tensorboard --logdir DIR`` shows as one run per folder: the train and test loss and
accuracy, the learning rate and the seconds of each epoch, one point per epoch. The
events are written from the run's history once training ends (a resumed run's whole
history), into a fresh folder that then replaces ``DIR/RUN``; a ``DIR/RUN`` holding
anything but event files is refused before training, never replaced.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from flatcli.errors import OutputError, UsageError
from flatcli.workflows.training import EpochRecord

__all__ = ["EVENT_PREFIX", "SCALARS", "check_log_dir", "write_tensorboard"]

#: TensorBoard's event files start with this name.
EVENT_PREFIX = "events.out.tfevents."

#: The scalar tags written, each from a field of :class:`EpochRecord`.
SCALARS: dict[str, str] = {
    "loss/train": "train_loss",
    "loss/test": "test_loss",
    "accuracy/train": "train_accuracy",
    "accuracy/test": "test_accuracy",
    "lr": "lr",
    "seconds": "seconds",
}


class _Writer(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...

    def close(self) -> None: ...


def _writer_class() -> Callable[[str], _Writer]:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line UsageError naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(
            "--tensorboard needs the tensorboard package",
            hint="pip install 'flatcli[tensorboard]'",
        ) from None
    return SummaryWriter


def check_log_dir(log_dir: Path, run_name: str | None) -> Path | None:
    """The folder the run's events go to, ``log_dir/run_name``, checked before training:
    tensorboard is installed, ``log_dir`` is a folder or can be one, and an existing
    ``log_dir/run_name`` holds only event files (it is replaced, nothing else is).
    ``run_name`` None (not known yet): the first two only.
    """
    _writer_class()
    if log_dir.exists() and not log_dir.is_dir():
        raise UsageError(f"--tensorboard {log_dir} is a file", hint="give a folder")
    if run_name is None:
        return None
    target = log_dir / run_name
    if target.exists():
        foreign = (
            [target.name]
            if not target.is_dir()
            else [p.name for p in target.iterdir() if not p.name.startswith(EVENT_PREFIX)]
        )
        if foreign:
            raise UsageError(
                f"--tensorboard: {target} holds files that are not TensorBoard events: "
                f"{', '.join(sorted(foreign)[:3])}",
                hint="choose another --tensorboard folder",
            )
    return target


def write_tensorboard(log_dir: Path, run_name: str, history: Sequence[EpochRecord]) -> Path:
    """Write ``history`` as the events of ``log_dir/run_name`` (replacing its old events);
    return that folder.
    """
    target = log_dir / run_name
    check_log_dir(log_dir, run_name)
    writer_class = _writer_class()
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        staging = log_dir / f".{run_name}.{os.getpid()}.tmp"  # this process's own
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write --tensorboard {log_dir}: {exc.strerror or exc}") from None
    try:
        writer = writer_class(str(staging))
        for record in history:
            for tag, name in SCALARS.items():
                writer.add_scalar(tag, float(getattr(record, name)), global_step=record.epoch)
        writer.close()
        if target.exists():
            shutil.rmtree(target)  # event files only (check_log_dir)
        staging.rename(target)
    except OSError as exc:
        raise OutputError(f"cannot write --tensorboard {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
