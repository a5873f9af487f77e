"""The run folder of ``flatcli train``: planned, locked, staged and put in place.

A run folder is written by one process at a time (:class:`RunLock`, an ``flock``), holds
only flatcli's files (:func:`plan_run` refuses any other), and is replaced by
``--overwrite`` only once the new run is complete: the new run is written into a
staging folder whose files are then moved over the old ones (:func:`run_folder`). Every
``OSError`` on the way is one :class:`~flatcli.errors.OutputError` (:func:`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flatcli.config import TrainConfig
from flatcli.errors import OutputError, RunExistsError, few
from flatcli.workflows.checkpoint import (
    LOCK_FILE,
    MODEL_FILE,
    RUN_FILES,
    STAGING_DIR,
    STATE_FILE,
    TRAIN_FILES,
    is_run_file,
    load_state_file,
    remove_temporaries,
)

__all__ = [
    "RunFolder",
    "RunMode",
    "RunLock",
    "default_run_dir",
    "plan_run",
    "read_run_options",
    "run_folder",
    "write_error",
]

#: What training into a folder does: start a new run, continue one, or replace one.
RunMode = Literal["fresh", "resume", "overwrite"]


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/DATASET-MODEL-OPTIMIZER-sSEED`` (a ``-2``, ``-3``... suffix for a new run when taken)."""
    base = (
        Path("runs")
        / f"{config.dataset}-{config.model}-{config.recipe or config.optimizer}-s{config.seed}"
    )
    out, k = base, 2
    while out.exists() and not config.resume:
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out


def plan_run(out: Path, config: TrainConfig) -> RunMode:
    """What training into ``out`` will do: ``fresh``, ``resume`` or ``overwrite``; refuse otherwise.

    A folder holding anything that is not flatcli's own (:func:`is_run_file`) is never
    written into, so that no ``--out`` (``.`` included) can cost a user's file.
    """
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"--out {out} is a file, not a run directory")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if config.resume:
        if not (out / STATE_FILE).is_file():
            why = (
                "it is already complete"
                if (out / MODEL_FILE).is_file()
                else "it holds no resumable state"
            )
            raise RunExistsError(f"cannot resume {out}: {why}")
        return "resume"
    foreign = [n for n in names if not is_run_file(n)]
    if foreign:
        shown = few(foreign)
        raise RunExistsError(
            f"{out} holds files that are not a flatcli run's: {shown}",
            hint="choose another --out; --overwrite replaces only a run's own files",
        )
    if any(n in RUN_FILES for n in names):
        if not config.overwrite:
            raise RunExistsError(
                f"{out} already holds a run",
                hint="pass --overwrite to replace it, --resume to continue it",
            )
        return "overwrite"
    return "fresh"


def _make_dirs(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; return those created, innermost first."""
    missing = []
    for folder in [out, *out.parents]:
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/.flatcli.lock``, removed on release.

    The file is unlinked while still locked; a process that opened it just before then
    finds that the path no longer names the inode it locked, and tries again, so two
    processes never both hold the lock of one folder.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise RunExistsError(
                    f"{folder} is in use: another flatcli train{holder} is writing to it",
                    hint="wait for it to finish, or choose another --out",
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd: int | None = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())

    def release(self) -> None:
        """Unlink the lock file and close it (which releases the lock); idempotent."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@dataclass
class RunFolder:
    """The run folder one training writes, as :func:`run_folder` prepared it.

    Attributes:
        out: the run folder.
        work: where this process writes: ``out``, or its staging folder for
            ``--overwrite``; None on the ranks other than 0, which write nothing.
        mode: ``fresh``, ``resume`` or ``overwrite`` (:func:`plan_run`).
        trained: past the run's last collective: the other ranks wait for rank 0's last word.
    """

    out: Path
    work: Path | None
    mode: RunMode
    trained: bool = False


@contextlib.contextmanager
def run_folder(config: TrainConfig) -> Iterator[RunFolder]:
    """Check, create and lock the run folder; on success put the new run in place.

    ``--overwrite`` trains into ``DIR/.flatcli-staging`` and only at the end moves each
    file over the old one (``os.replace``) and deletes the old run's files the new run
    lacks, so an error, Ctrl-C or kill during the new run leaves the old run whole. A
    staging folder that such a kill left behind is discarded by the next train into the
    folder (``--resume`` included: it continues the old run, if that one was unfinished).
    A run that fails before its first epoch is saved removes the folders it created;
    after that its ``resume.safetensors`` stays, for ``--resume``.
    """
    out = Path(config.out) if config.out is not None else default_run_dir(config)
    lock: RunLock | None = None
    created: list[Path] = []
    done = False
    folder: RunFolder | None = None
    try:
        plan_run(out, config)  # refuse before creating or locking anything
        created = _make_dirs(out)
        lock = RunLock(out)
        mode = plan_run(
            out, config
        )  # again, under the lock: another process may have finished meanwhile
        shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
        remove_temporaries(out)
        work = out / STAGING_DIR if mode == "overwrite" else out
        folder = RunFolder(out, work, mode)
        if mode == "overwrite":
            work.mkdir()
        yield folder
        if mode == "overwrite":
            _swap_in(work, out)
        remove_temporaries(out)
        done = True
    except OSError as exc:
        raise write_error(exc, out, folder) from None
    finally:
        if lock is not None and not done:
            if folder is not None and folder.mode == "overwrite" and folder.work is not None:
                shutil.rmtree(folder.work, ignore_errors=True)
            if folder is not None:
                with contextlib.suppress(OSError):
                    remove_temporaries(out)
            if created and not (out / STATE_FILE).exists():
                for name in TRAIN_FILES:
                    with contextlib.suppress(OSError):
                        (out / name).unlink(missing_ok=True)
                lock.release()
                for path in created:  # innermost first; a folder someone else wrote into stays
                    with contextlib.suppress(OSError):
                        path.rmdir()
        if lock is not None:
            lock.release()


def _swap_in(staging: Path, out: Path) -> None:
    """Move the new run's files over the old ones, ``model.safetensors`` last, then drop the old extras."""
    remove_temporaries(staging)
    new = sorted((p.name for p in staging.iterdir()), key=lambda name: name == MODEL_FILE)
    for name in new:
        os.replace(staging / name, out / name)
    for name in RUN_FILES:
        if name not in new:
            (out / name).unlink(missing_ok=True)
    staging.rmdir()


def write_error(exc: OSError, out: Path, folder: RunFolder | None) -> OutputError:
    """The one-line error for an ``OSError`` while creating, locking or writing the run in ``out``.

    ``folder`` None: the folder was not yet created or locked. The hint names the cause
    a user can act on (a full disk, a folder that is not writable).
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    if folder is None:
        message = f"cannot create or lock the run folder {out}: {reason}"
    else:
        message = f"cannot write the run in {out}: {reason}" + (
            "; the old run is kept" if folder.mode == "overwrite" else ""
        )
    if exc.errno == errno.ENOSPC:
        hint = "free some disk space, or choose another --out"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the folder is not writable: choose another --out"
    else:
        hint = None
    return OutputError(message, hint=hint)


def read_run_options(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The options an unfinished run in ``out`` was started with (None if its state predates them)."""
    folder = Path(out)
    plan_run(folder, TrainConfig(resume=True))
    options = load_state_file(folder / STATE_FILE, tensors=False).get("options")
    return options if isinstance(options, dict) else None
