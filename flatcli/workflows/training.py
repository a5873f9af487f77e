"""Training: optimisers, the two kinds of weight regularisation, schedules, averaging.

Two regularisers that are easy to confuse and that the paper keeps apart:

* **coupled L2** (``l2 = lambda``): the loss gains ``lambda/2 ||w||^2``, so ``lambda w`` is
  added to the gradient before the optimiser sees it. This is what ``weight_decay`` means
  in ``torch.optim.SGD`` and ``torch.optim.Adam``; with Adam it is rescaled by the
  adaptive denominators.
* **decoupled weight decay** (``weight_decay = mu``): before each step
  ``w <- w (1 - lr mu)``, independent of the gradient (Loshchilov & Hutter 2019), which is
  what ``torch.optim.AdamW`` does.

flatcli applies both itself, with the optimiser's own ``weight_decay`` left at 0, so
that each is available with every optimiser and both are recorded separately.

Schedules are ``torch.optim.lr_scheduler.LambdaLR`` factors stepped once per epoch;
``paper`` is the authors' schedule: ``lr`` held to 50% of the budget, linear decay to
``lr_final`` at 90%, then held (budget = averaging start, else all epochs). Iterate
averaging uses ``torch.optim.swa_utils.AveragedModel`` (arithmetic mean, one snapshot per
epoch from ``average_from``) and ``update_bn`` to recompute BatchNorm statistics over the
training set (Izmailov et al. 2018; Granziol et al., Gadam).

A run folder is written by one process at a time (a lock), holds only flatcli's files,
and is replaced by ``--overwrite`` only once the new run is complete (see
:func:`_run_folder`); a resumed run is held to the options stored with its state.

**Data parallel** (``torchrun --nproc-per-node N``): ``batch_size`` B stays the global
batch, so N processes train the one-process recipe. Every rank draws the same
per-epoch permutation (:func:`_epoch_generator`; a ``DistributedSampler`` would draw
another order than one process), cuts each global batch into N contiguous parts
(:meth:`flatcli.distributed.World.shard`) and weights its summed loss by N/B, so that
the gradient ``DistributedDataParallel`` averages over the ranks is that of the global
batch mean, (1/N) sum_r (N/B) sum_{i in part r} grad l_i = (1/B) sum_i grad l_i (B the
batch's own size for a last, smaller batch). Regularisers, schedules and averaging act
on identical weights on every rank. BatchNorm normalises over each rank's B/N samples
(the paper's single-GPU statistics, per rank; rank 0's running statistics are kept),
or over the global batch with ``sync_bn`` (``torch.nn.SyncBatchNorm``, CUDA only).
Rank 0 alone checks, locks and writes the run folder and tells the other ranks its
decision (a refusal ends every rank with the same line). Evaluation shards the samples
and all-reduces the sums, so the metrics are the one-process ones up to float rounding.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from flatcli import __version__, distributed
from flatcli.config import TrainConfig, contradiction
from flatcli.distributed import DistributedError, World
from flatcli.errors import (
    CheckpointError,
    FlatcliError,
    OutputError,
    RunExistsError,
    UnknownNameError,
    UsageError,
    few,
    first_line,
)
from flatcli.models import build_model, resolve_kwargs
from flatcli.workflows.checkpoint import (
    LAST_FILE,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RUN_FILES,
    STAGING_DIR,
    STATE_FILE,
    TRAIN_FILES,
    atomic_write_text,
    is_run_file,
    load_state_file,
    remove_temporaries,
    save_checkpoint,
    save_state,
)
from flatcli.workflows.data import augment_batch, get_spec, load_dataset

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr),
    # Adam whose decay is decoupled: flatcli applies ``weight_decay`` itself (see module doc).
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0),
}


def _paper_factor(epoch: int, budget: int, final_ratio: float) -> float:
    """The authors' schedule factor after ``epoch`` completed epochs."""
    t = epoch / budget
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - final_ratio) * (t - 0.5) / 0.4
    return final_ratio


SCHEDULES: dict[str, Callable[[TrainConfig], Callable[[int], float]]] = {
    "constant": lambda c: lambda epoch: 1.0,
    "cosine": lambda c: (
        lambda epoch: (
            (c.final_lr / c.lr)
            + (1 - c.final_lr / c.lr)
            * 0.5
            * (1 + math.cos(math.pi * min(epoch, c.epochs) / c.epochs))
        )
    ),
    "paper": lambda c: (
        lambda epoch: _paper_factor(
            epoch,
            (c.average_from - 1) if c.average_from and c.average_from > 1 else c.epochs,
            c.final_lr / c.lr,
        )
    ),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; any other device must exist here.

    A device is tried by allocating an empty tensor on it, which is what fails later
    (``mps`` on Linux, ``cuda:3`` on a one-GPU machine) if it is not checked now.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA device is available", hint="use --device cpu"
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu or cuda") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        text = first_line(exc)
        why = f" ({text})" if len(text) <= 80 else ""  # torch's dispatcher message runs to a page
        raise UsageError(
            f"--device {name} is not available on this machine{why}", hint="use auto, cpu or cuda"
        ) from None
    return device


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`: final metrics of the saved model and where it is."""

    run_dir: Path
    checkpoint: Path
    metrics: dict
    history: list[EpochRecord] = field(default_factory=list)


@dataclass
class TrainCallbacks:
    """Hooks the CLI uses for progress; the library itself never prints."""

    on_start: Callable[[int, int, int], None] = lambda start_epoch, epochs, batches: None
    on_batch: Callable[[int, int, float], None] = lambda epoch, batch, loss: None
    on_epoch: Callable[[EpochRecord], None] = lambda record: None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 1024,
    world: World | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on the given data.

    With ``world`` of N processes (every rank calls this), each rank takes its
    contiguous shard of the samples and the sums over the shards are all-reduced: the
    mean over all samples, as one process computes it up to float rounding.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shard = world.shard(len(targets))
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(shard.start, shard.stop, batch_size):
        stop = min(start + batch_size, shard.stop)
        x, y = inputs[start:stop].to(device), targets[start:stop].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    if world.size > 1:
        distributed.all_reduce_sum([loss, correct])
    return float(loss) / len(targets), int(correct) / len(targets)


def weight_norm(model: nn.Module) -> float:
    """Euclidean norm of all parameters (buffers excluded)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


def regularised_step(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], l2: float, weight_decay: float
) -> None:
    """Apply coupled L2 to the gradients and decoupled decay to the weights, then step.

    ``grad <- grad + l2 w`` (coupled) and ``w <- w (1 - lr mu)`` (decoupled, at the
    current scheduled ``lr``), then the optimiser's own update.
    """
    if not (l2 or weight_decay):
        optimizer.step()
        return
    with torch.no_grad():
        with_grad = [p for p in params if p.grad is not None]
        if l2:
            torch._foreach_add_([p.grad for p in with_grad], with_grad, alpha=l2)
        if weight_decay:
            lr = optimizer.param_groups[0]["lr"]
            torch._foreach_mul_(with_grad, 1.0 - lr * weight_decay)
    optimizer.step()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    augment: bool,
    on_batch: Callable[[int, float], None] | None = None,
    world: World | None = None,
) -> tuple[float, float]:
    """One pass over the data in the order drawn from ``generator``; returns (loss, accuracy).

    The loss and accuracy are running means over the epoch's batches (as seen while
    training, with augmentation). With ``world`` of N processes, ``model`` is a
    ``DistributedDataParallel``; each global batch of B' <= B samples is cut into N
    contiguous parts and rank r minimises (N/B') sum_{i in part r} l_i, whose gradients
    DDP averages into (1/B') sum_i grad l_i, the one-process gradient (module doc).
    The augmentation draws are the whole batch's (every generator stays in step).
    """
    world = world or World()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(targets)
    order = torch.randperm(n, generator=generator).to(inputs.device)
    total_loss = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for b, start in enumerate(range(0, n, config.batch_size)):
        idx = order[start : start + config.batch_size]
        part = world.shard(len(idx))
        x, y = inputs[idx[part]], targets[idx[part]]
        if augment:
            x = augment_batch(x, generator, part=(len(idx), part))
        logits = model(x)
        if world.size == 1:
            loss = F.cross_entropy(logits, y)
            total_loss += loss.detach() * len(y)
        else:
            summed = F.cross_entropy(logits, y, reduction="sum")
            loss = summed * (world.size / len(idx))
            total_loss += summed.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        regularised_step(optimizer, params, config.l2, config.weight_decay)
        correct += (logits.detach().argmax(1) == y).sum()
        if on_batch is not None:
            on_batch(b, loss.detach() if world.size == 1 else summed.detach() / max(len(y), 1))
    if world.size > 1:
        distributed.all_reduce_sum([total_loss, correct])
    return float(total_loss) / n, int(correct) / n


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): a resumed run draws exactly what it would have drawn.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


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


def _plan(out: Path, config: TrainConfig) -> str:
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


class _RunLock:
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
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())

    def release(self) -> None:
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
class _RunFolder:
    out: Path  # the run folder
    work: (
        Path | None
    )  # where this process writes: ``out``, or its staging folder for --overwrite (None: rank > 0)
    mode: str
    trained: bool = (
        False  # past the run's last collective: the other ranks wait for rank 0's last word
    )


@contextlib.contextmanager
def _run_folder(config: TrainConfig) -> Iterator[_RunFolder]:
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
    lock, created, done = None, [], False
    folder = None
    try:
        _plan(out, config)  # refuse before creating or locking anything
        created = _make_dirs(out)
        lock = _RunLock(out)
        mode = _plan(
            out, config
        )  # again, under the lock: another process may have finished meanwhile
        shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
        remove_temporaries(out)
        folder = _RunFolder(out, out / STAGING_DIR if mode == "overwrite" else out, mode)
        if mode == "overwrite":
            folder.work.mkdir()
        yield folder
        if mode == "overwrite":
            _swap_in(folder.work, out)
        remove_temporaries(out)
        done = True
    except OSError as exc:
        raise _write_error(exc, out, folder) from None
    finally:
        if lock is not None and not done:
            if folder is not None and folder.mode == "overwrite":
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


def _write_error(exc: OSError, out: Path, folder: _RunFolder | None) -> OutputError:
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


def read_run_options(out: str | os.PathLike) -> dict | None:
    """The options an unfinished run in ``out`` was started with (None if its state predates them)."""
    out = Path(out)
    _plan(out, TrainConfig(resume=True))
    options = load_state_file(out / STATE_FILE, tensors=False).get("options")
    return options if isinstance(options, dict) else None


def _check_resume(options: dict, state: dict, config: TrainConfig) -> None:
    """Refuse to continue a run with options other than its own (``epochs`` may change).

    ``epochs`` may change when the learning rates of the epochs already run do not
    depend on it: the schedule's factors for epochs ``0..done`` must be unchanged (the
    factor after epoch ``done`` is already in the saved optimiser). A cosine schedule
    therefore fixes the epochs; ``constant`` and ``paper`` with averaging do not.
    """
    done = state.get("epoch")
    stored = state.get("options")
    if not isinstance(done, int) or not isinstance(state.get("history"), list):
        raise CheckpointError(f"{config.out / STATE_FILE} is not a flatcli training state")
    problems = []
    if isinstance(stored, dict):
        for key, value in options.items():
            if key in ("epochs", "device") or key not in stored or stored[key] == value:
                continue
            if key == "model_kwargs" and isinstance(stored[key], dict):
                problems += [
                    contradiction(k, v, stored[key].get(k))
                    for k, v in value.items()
                    if stored[key].get(k) != v
                ]
            else:
                problems.append(contradiction(key, value, stored[key]))
    if config.epochs < done:
        problems.append(
            f"--epochs {config.epochs} is fewer than the {done} epochs the run has done"
        )
    elif (
        isinstance(stored, dict)
        and not problems
        and isinstance(stored.get("epochs"), int)
        and stored["epochs"] != config.epochs
    ):
        before = replace(config, epochs=stored["epochs"])  # all else is equal (no problems above)
        old_f, new_f = SCHEDULES[config.schedule](before), SCHEDULES[config.schedule](config)
        if any(old_f(e) != new_f(e) for e in range(done + 1)):
            problems.append(
                contradiction("epochs", config.epochs, stored["epochs"])
                + f": the {config.schedule} schedule of the {done} epochs already run depends on it"
            )
    if problems:
        raise UsageError(
            "; ".join(problems), hint="--resume alone continues the run with its own options"
        )


def train(config: TrainConfig, callbacks: TrainCallbacks | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` and save the run; see the module doc.

    Every option is checked, the model built and the data loaded before the run folder
    is touched; the folder is then locked for the whole run (see :func:`_run_folder`).
    """
    cb = callbacks or TrainCallbacks()
    world = distributed.init(config.device)
    device = resolve_device(distributed.device_for(config.device))
    spec = get_spec(config.dataset)
    kwargs = resolve_kwargs(config.model, **config.model_kwargs)
    if config.optimizer not in OPTIMIZERS:
        _unknown("optimizer", config.optimizer, OPTIMIZERS)
    if config.schedule not in SCHEDULES:
        _unknown("schedule", config.schedule, SCHEDULES)
    if config.sync_bn and world.size > 1 and device.type != "cuda":
        raise UsageError(
            "--sync-bn needs CUDA devices: torch.nn.SyncBatchNorm synchronises GPU tensors only",
            hint="drop --sync-bn: each process then normalises over its part of the batch",
        )
    augment = spec.augment_by_default if config.augment is None else config.augment
    torch.manual_seed(config.seed)
    model = build_model(
        config.model, input_shape=spec.input_shape, num_classes=spec.num_classes, **kwargs
    )

    def load() -> tuple:
        return (
            load_dataset(
                config.dataset,
                "train",
                config.data_dir,
                download=config.download,
                samples=config.train_samples,
            ),
            load_dataset(config.dataset, "test", config.data_dir, download=config.download),
        )

    if config.download and world.size > 1:  # rank 0 downloads, then the others read its files
        train_set, test_set = _main_first(world, load)
    else:
        train_set, test_set = load()
    #: What the run is (not where it is written): stored with its resume state, recorded in its checkpoints.
    options = {**config.recorded(), "model_kwargs": kwargs, "augment": augment}
    args = (config, options, model, spec, device, augment, train_set, test_set, cb)

    if not world.is_main:  # rank 0 decides about the folder (and reads any resume state)
        decision = _from_main(None)
        run = _RunFolder(decision["out"], None, decision["mode"])
        result = _train_in(run, *args, state=decision["state"], world=world)
        _from_main(None)  # rank 0's files are in place, or its error is raised here too
        return result
    run, told = None, False
    try:
        with _run_folder(config) as run:
            try:
                state = _resume_state(run, config, options) if run.mode == "resume" else None
                _from_main({"out": run.out, "mode": run.mode, "state": state})
                told = True
                result = _train_in(run, *args, state=state, world=world)
            except OSError as exc:
                raise _write_error(exc, run.out, run) from None
        _from_main("done")
        return result
    except BaseException as exc:
        # Tell the other ranks only where they wait for rank 0's word (before and after the
        # training's collectives); during training they learn of its exit from the collective.
        if world.size > 1 and (not told or (run is not None and run.trained)):
            with contextlib.suppress(DistributedError):
                _from_main(exc)
        raise


def _from_main(word):
    """Rank 0's ``word`` on every rank; an exception from rank 0 is raised on every rank.

    A :class:`FlatcliError` is re-created with its class, message and hint, so that
    every rank ends with rank 0's one line and exit code; anything else says that
    process 0 failed. One process: returns ``word``.
    """
    if isinstance(word, BaseException):
        if isinstance(word, FlatcliError):
            word = ("error", type(word), word.message, word.hint)
        else:
            word = (
                "error",
                DistributedError,
                f"process 0 of this run failed ({first_line(word)})",
                None,
            )
    received = distributed.broadcast_object(word)
    if isinstance(received, tuple) and received[:1] == ("error",):
        _, cls, message, hint = received
        exc = cls.__new__(cls)
        FlatcliError.__init__(exc, message, hint)
        raise exc
    return received


def main_decides(action: Callable):
    """``action()`` on rank 0 alone; its value, or its error, on every rank (one process: ``action()``).

    For what reads the run folder (e.g. a run's stored options for ``--resume``), which
    only rank 0 may be able to see.
    """
    if not distributed.active():
        return action()
    if distributed.world().is_main:
        return _from_main(_on_main(action))
    return _from_main(None)


def _main_first(world: World, action: Callable):
    """``action()`` on rank 0, then (if it succeeded) on the other ranks: e.g. a download."""
    if world.is_main:
        value = _on_main(action)
        _from_main("done")
        return value
    _from_main(None)
    return action()


def _on_main(action: Callable):
    """``action()`` on rank 0; an error it raises is first sent to the other ranks, then raised here."""
    try:
        return action()
    except BaseException as exc:
        with contextlib.suppress(DistributedError):
            _from_main(exc)
        raise


def _resume_state(run: _RunFolder, config: TrainConfig, options: dict) -> dict:
    """The stored state of the run in ``run``, checked against the options given now."""
    state = load_state_file(run.work / STATE_FILE)
    _check_resume(options, state, replace(config, out=run.out))
    return state


def _train_in(
    run: _RunFolder,
    config: TrainConfig,
    options: dict,
    model: nn.Module,
    spec,
    device: torch.device,
    augment: bool,
    train_set,
    test_set,
    cb: TrainCallbacks,
    state: dict | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train (from ``state`` when resuming) and, on rank 0, write the run into ``run.work``."""
    world = world or World()
    try:
        return _train_loop(
            run,
            config,
            options,
            model,
            spec,
            device,
            augment,
            train_set,
            test_set,
            cb,
            state,
            world,
        )
    except RuntimeError as exc:  # a collective of DDP failed: another rank died or timed out
        if world.size > 1 and _collective_failure(exc):
            raise DistributedError(
                f"another process of this run failed or timed out ({first_line(exc)[:120]})"
            ) from None
        raise


def _collective_failure(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    )


def _train_loop(
    run: _RunFolder,
    config: TrainConfig,
    options: dict,
    model: nn.Module,
    spec,
    device: torch.device,
    augment: bool,
    train_set,
    test_set,
    cb: TrainCallbacks,
    state: dict | None,
    world: World,
) -> TrainResult:
    out = run.work
    x_train, y_train = (t.to(device) for t in train_set.tensors)
    x_test, y_test = test_set.tensors
    model = model.to(device)
    if config.sync_bn and world.size > 1:  # same parameters and buffers, state dict keys unchanged
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = OPTIMIZERS[config.optimizer](list(model.parameters()), config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[config.schedule](config))
    averaged = AveragedModel(model) if config.average_from else None

    history: list[EpochRecord] = []
    start_epoch, elapsed = 0, 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if averaged is not None:
                averaged.load_state_dict(state["averaged"])
            history = [EpochRecord(**r) for r in state["history"]]
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{run.out / STATE_FILE} does not match this run's model and optimiser "
                f"({first_line(exc)})",
                hint="was it made by another flatcli version?",
            ) from None
        start_epoch, elapsed = state["epoch"], float(state.get("elapsed", 0.0))

    trainer = model
    if world.size > 1:  # broadcasts rank 0's parameters and buffers; averages gradients in backward
        trainer = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    n_batches = math.ceil(len(y_train) / config.batch_size)
    cb.on_start(start_epoch, config.epochs, n_batches)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        generator = _epoch_generator(config.seed, epoch)
        # dropout, if any: its own stream per rank (rank 0's is the one-process stream)
        torch.manual_seed(config.seed * 1_000_003 + epoch + (world.rank << 40))
        lr = optimizer.param_groups[0]["lr"]
        loss, acc = train_one_epoch(
            trainer,
            optimizer,
            x_train,
            y_train,
            config,
            generator,
            augment,
            lambda b, l, e=epoch: cb.on_batch(e, b, l),
            world=world,
        )
        scheduler.step()
        if world.size > 1:  # each rank's BatchNorm statistics saw its own part: keep rank 0's
            distributed.broadcast(list(model.buffers()))
        if averaged is not None and epoch >= config.average_from:
            averaged.update_parameters(model)
        test_loss, test_acc = evaluate(model, x_test, y_test, world=world)
        record = EpochRecord(epoch, lr, loss, acc, test_loss, test_acc, time.perf_counter() - t0)
        history.append(record)
        elapsed += record.seconds
        if world.is_main:
            save_state(
                out / STATE_FILE,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "averaged": averaged.state_dict() if averaged else None,
                    "epoch": epoch,
                    "elapsed": elapsed,
                    "history": [r.__dict__ for r in history],
                    "options": options,
                },
            )
            atomic_write_text(
                out / METRICS_FILE, "".join(json.dumps(r.__dict__) + "\n" for r in history)
            )
        cb.on_epoch(record)

    final = model
    base_meta = {
        "arch": {"name": config.model, "kwargs": options["model_kwargs"]},
        "dataset": spec.describe(),
        "train": {**options, "torch_version": torch.__version__, "flatcli_version": __version__},
    }
    if averaged is not None:
        last_metrics = final_metrics(model, x_train, y_train, x_test, y_test, world)
        if world.is_main:
            save_checkpoint(out / LAST_FILE, model, {**base_meta, "metrics": last_metrics})
        _recompute_bn(averaged, x_train, config.batch_size, device, world)
        final = averaged.module
    metrics = final_metrics(final, x_train, y_train, x_test, y_test, world)
    metrics["epochs"] = config.epochs
    run.trained = True
    if world.is_main:
        save_checkpoint(out / MODEL_FILE, final, {**base_meta, "metrics": metrics})
        (out / STATE_FILE).unlink(missing_ok=True)
    return TrainResult(run.out, run.out / MODEL_FILE, {**metrics, "seconds": elapsed}, history)


def _recompute_bn(
    averaged: AveragedModel,
    x_train: torch.Tensor,
    batch_size: int,
    device: torch.device,
    world: World,
) -> None:
    """BatchNorm statistics for the averaged weights: ``update_bn`` over the training set.

    ``update_bn`` sets each running mean and variance to the mean over the batches of
    B of their batch statistics (Izmailov et al. 2018). With N processes each rank
    forwards its part of every batch, as in training, and the ranks' statistics are
    averaged: with SyncBatchNorm every part sees the whole batch's statistics (the
    one-process result); without, each is that of B/N samples, as BatchNorm was trained.
    """
    batches = [x_train[i : i + batch_size] for i in range(0, len(x_train), batch_size)]
    if world.size == 1:
        update_bn(batches, averaged, device=device)
        return
    sync = any(isinstance(m, nn.SyncBatchNorm) for m in averaged.modules())
    parts = [b[world.shard(len(b))] for b in batches]
    update_bn(
        [p for p in parts if len(p) or sync], averaged, device=device
    )  # SyncBatchNorm needs every rank
    stats = [
        t
        for m in averaged.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
        if t is not None
    ]
    distributed.all_reduce_sum(stats)
    for t in stats:
        t.div_(world.size)


def final_metrics(
    model: nn.Module, x_train, y_train, x_test, y_test, world: World | None = None
) -> dict:
    train_loss, train_acc = evaluate(model, x_train, y_train, world=world)
    test_loss, test_acc = evaluate(model, x_test, y_test, world=world)
    return {
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "weight_norm": weight_norm(model),
    }


def _unknown(kind: str, name: str, registry: dict):
    raise UnknownNameError(f"unknown {kind} {name!r}", hint=f"choose one of: {', '.join(registry)}")
