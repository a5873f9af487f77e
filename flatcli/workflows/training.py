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

The run folder (its lock, staging for ``--overwrite``, clean-up on failure) is
:mod:`flatcli.workflows.run_folder`; a resumed run is held to the options stored with its
state (:func:`_check_resume`).

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
import csv
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import NoReturn, SupportsFloat

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import TensorDataset

from flatcli import __version__, distributed
from flatcli.analysis.progress import ProgressCallback, Task
from flatcli.config import Options, TrainConfig, contradiction
from flatcli.distributed import (
    DistributedError,
    World,
    from_main,
    main_first,
    resolve_device,
)
from flatcli.errors import CheckpointError, UnknownNameError, UsageError, first_line
from flatcli.models import build_model, resolve_kwargs
from flatcli.workflows.checkpoint import (
    LAST_FILE,
    METRICS_CSV_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    State,
    atomic_write_text,
    load_state_file,
    read_metadata,
    save_checkpoint,
    save_state,
)
from flatcli.workflows.data import DatasetSpec, augment_batch, get_spec, load_dataset
from flatcli.workflows.provenance import provenance
from flatcli.workflows.run_folder import (
    RunFolder,
    RunMode,
    run_folder,
    write_error,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochRecord",
    "TrainCallbacks",
    "RunHistory",
    "TrainResult",
    "evaluate",
    "final_metrics",
    "metrics_csv",
    "read_history",
    "regularised_step",
    "train",
    "train_one_epoch",
    "weight_norm",
]


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


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a run: its learning rate, its running training metrics, its test metrics."""

    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float


def metrics_csv(history: Sequence[EpochRecord]) -> str:
    """The rows of ``metrics.jsonl`` as CSV: a header of the :class:`EpochRecord` fields, one row per epoch.

    Written whole from the run's history after each epoch, like ``metrics.jsonl``, so a
    resumed run (whose history comes from its resume state) never repeats a row.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(f.name for f in fields(EpochRecord))
    writer.writerows(astuple(r) for r in history)
    return buffer.getvalue()


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`: final metrics of the saved model and where it is."""

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    history: list[EpochRecord] = field(default_factory=list)


@dataclass
class TrainCallbacks:
    """Hooks the CLI uses for progress; the library itself never prints."""

    on_start: Callable[[int, int, int], None] = lambda start_epoch, epochs, batches: None
    #: ``(epoch, batch, loss)``: the loss a 0-d tensor, read (``float``) only if needed, so
    #: that a GPU run is not synchronised on every batch.
    on_batch: Callable[[int, int, SupportsFloat], None] = lambda epoch, batch, loss: None
    on_epoch: Callable[[EpochRecord], None] = lambda record: None

    @classmethod
    def ticking(cls, progress: ProgressCallback | None, task: str = "epochs") -> TrainCallbacks:
        """Callbacks that report the epochs as the progress task ``task`` (of the
        configured epochs; a resumed run starts at the epochs it had done). Only the
        epochs: a batch is never a tick.
        """
        state: dict[str, Task] = {}

        def on_start(start_epoch: int, epochs: int, batches: int) -> None:
            state["epochs"] = Task(progress, task, epochs, unit="epochs")
            if start_epoch:  # a resumed run: the epochs done before
                state["epochs"].update(start_epoch)
            if start_epoch >= epochs:  # nothing left to train
                state["epochs"].finish()

        def on_epoch(record: EpochRecord) -> None:
            state["epochs"].update(record.epoch)
            if record.epoch == state["epochs"].tick.total:
                state["epochs"].finish()

        return cls(on_start=on_start, on_epoch=on_epoch)


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
        with_grad: list[torch.Tensor] = [p for p in params if p.grad is not None]
        if l2:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_add_(grads, with_grad, alpha=l2)
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
    on_batch: Callable[[int, SupportsFloat], None] | None = None,
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
        torch.autograd.backward(loss)
        regularised_step(optimizer, params, config.l2, config.weight_decay)
        correct += (logits.detach().argmax(1) == y).sum()
        if on_batch is not None:
            on_batch(b, loss.detach() if world.size == 1 else summed.detach() / max(len(y), 1))
    if world.size > 1:
        distributed.all_reduce_sum([total_loss, correct])
    return float(total_loss) / n, int(correct) / n


#: Seeds of epoch ``e`` of a run of seed ``s`` are ``s * EPOCH_SEED_STRIDE + e``: one
#: stream per (seed, epoch), so that a resumed run draws exactly what it would have drawn.
EPOCH_SEED_STRIDE = 1_000_003
#: Rank r's dropout seed adds ``r << RANK_SEED_SHIFT`` (rank 0's is the one-process seed).
RANK_SEED_SHIFT = 40


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of the permutation and augmentation draws of ``epoch``."""
    return torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)


def _check_resume(options: Options, state: State, config: TrainConfig, out: Path) -> None:
    """Refuse to continue a run with options other than its own (``epochs`` may change).

    ``epochs`` may change when the learning rates of the epochs already run do not
    depend on it: the schedule's factors for epochs ``0..done`` must be unchanged (the
    factor after epoch ``done`` is already in the saved optimiser). A cosine schedule
    therefore fixes the epochs; ``constant`` and ``paper`` with averaging do not.
    """
    done = state.get("epoch")
    stored = state.get("options")
    if not isinstance(done, int) or not isinstance(state.get("history"), list):
        raise CheckpointError(f"{out / STATE_FILE} is not a flatcli training state")
    problems: list[str] = []
    if isinstance(stored, dict):
        for key, value in options.items():
            if key in ("epochs", "device") or key not in stored or stored[key] == value:
                continue
            if key == "model_kwargs" and isinstance(stored[key], dict) and isinstance(value, dict):
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
    is touched; the folder is then locked for the whole run
    (:func:`~flatcli.workflows.run_folder.run_folder`).
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

    def load() -> tuple[TensorDataset, TensorDataset]:
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
        train_set, test_set = main_first(world, load)
    else:
        train_set, test_set = load()
    job = _Job(
        config=config,
        # what the run is (not where it is written): stored with its resume state, recorded in its checkpoints
        options={**config.recorded(), "model_kwargs": kwargs, "augment": augment},
        model=model,
        spec=spec,
        device=device,
        augment=augment,
        train_set=train_set,
        test_set=test_set,
        callbacks=cb,
        world=world,
    )

    if not world.is_main:  # rank 0 decides about the folder (and reads any resume state)
        decision: _Decision = from_main(None)
        run = RunFolder(decision.out, None, decision.mode)
        result = _train_in(run, job, decision.state)
        from_main(None)  # rank 0's files are in place, or its error is raised here too
        return result
    folder: RunFolder | None = None
    told = False
    try:
        with run_folder(config) as folder:
            try:
                state = _resume_state(folder, job) if folder.mode == "resume" else None
                from_main(_Decision(folder.out, folder.mode, state))
                told = True
                result = _train_in(folder, job, state)
            except OSError as exc:
                raise write_error(exc, folder.out, folder) from None
        from_main("done")
        return result
    except BaseException as exc:
        # Tell the other ranks only where they wait for rank 0's word (before and after the
        # training's collectives); during training they learn of its exit from the collective.
        if world.size > 1 and (not told or (folder is not None and folder.trained)):
            with contextlib.suppress(DistributedError):
                from_main(exc)
        raise


@dataclass(frozen=True)
class _Decision:
    """Rank 0's word to the other ranks about the run folder: where, how, and any resume state."""

    out: Path
    mode: RunMode
    state: State | None


@dataclass(frozen=True)
class _Job:
    """Everything :func:`train` has checked, built and loaded before the run folder is touched."""

    config: TrainConfig
    options: Options
    model: nn.Module
    spec: DatasetSpec
    device: torch.device
    augment: bool
    train_set: TensorDataset
    test_set: TensorDataset
    callbacks: TrainCallbacks
    world: World


def _resume_state(run: RunFolder, job: _Job) -> State:
    """The stored state of the run in ``run``, checked against the options given now."""
    assert run.work is not None  # rank 0 reads the state
    state = load_state_file(run.work / STATE_FILE)
    _check_resume(job.options, state, job.config, run.out)
    return state


def _train_in(run: RunFolder, job: _Job, state: State | None) -> TrainResult:
    """Train (from ``state`` when resuming) and, on rank 0, write the run into ``run.work``."""
    try:
        return _train_loop(run, job, state)
    except RuntimeError as exc:  # a collective of DDP failed: another rank died or timed out
        if job.world.size > 1 and _collective_failure(exc):
            raise DistributedError(
                f"another process of this run failed or timed out ({first_line(exc)[:120]})"
            ) from None
        raise


def _collective_failure(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    )


def _train_loop(run: RunFolder, job: _Job, state: State | None) -> TrainResult:
    """The epochs of :func:`train`, then the final (averaged) model; rank 0 writes into ``run.work``."""
    config, options, world, cb = job.config, job.options, job.world, job.callbacks
    device, out = job.device, run.work  # out: None on the ranks that write nothing
    x_train, y_train = (t.to(device) for t in job.train_set.tensors)
    x_test, y_test = job.test_set.tensors
    model = job.model.to(device)
    if config.sync_bn and world.size > 1:  # same parameters and buffers, state dict keys unchanged
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
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

    trainer: nn.Module = model
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
        torch.manual_seed(config.seed * EPOCH_SEED_STRIDE + epoch + (world.rank << RANK_SEED_SHIFT))
        lr = optimizer.param_groups[0]["lr"]
        loss, acc = train_one_epoch(
            trainer,
            optimizer,
            x_train,
            y_train,
            config,
            generator,
            job.augment,
            partial(cb.on_batch, epoch),
            world=world,
        )
        scheduler.step()
        if world.size > 1:  # each rank's BatchNorm statistics saw its own part: keep rank 0's
            distributed.broadcast(list(model.buffers()))
        if (
            averaged is not None
            and config.average_from is not None
            and epoch >= config.average_from
        ):
            averaged.update_parameters(model)
        test_loss, test_acc = evaluate(model, x_test, y_test, world=world)
        record = EpochRecord(epoch, lr, loss, acc, test_loss, test_acc, time.perf_counter() - t0)
        history.append(record)
        elapsed += record.seconds
        if out is not None:  # rank 0
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
            atomic_write_text(out / METRICS_CSV_FILE, metrics_csv(history))
        cb.on_epoch(record)

    final: nn.Module = model
    base_meta = {
        "arch": {"name": config.model, "kwargs": options["model_kwargs"]},
        "dataset": job.spec.describe(),
        "train": {**options, "torch_version": torch.__version__, "flatcli_version": __version__},
        "provenance": provenance(device),
    }
    if averaged is not None:
        last_metrics = final_metrics(model, x_train, y_train, x_test, y_test, world)
        if out is not None:
            save_checkpoint(out / LAST_FILE, model, {**base_meta, "metrics": last_metrics})
        _recompute_bn(averaged, x_train, config.batch_size, device, world)
        final = averaged.module
    metrics = final_metrics(final, x_train, y_train, x_test, y_test, world)
    metrics["epochs"] = config.epochs
    run.trained = True
    if out is not None:
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
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    world: World | None = None,
) -> dict[str, float]:
    """Loss and accuracy on the training and test sets, and the weight norm, of ``model``."""
    train_loss, train_acc = evaluate(model, x_train, y_train, world=world)
    test_loss, test_acc = evaluate(model, x_test, y_test, world=world)
    return {
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "weight_norm": weight_norm(model),
    }


def _unknown(kind: str, name: str, registry: Mapping[str, object]) -> NoReturn:
    raise UnknownNameError(f"unknown {kind} {name!r}", hint=f"choose one of: {', '.join(registry)}")


@dataclass(frozen=True)
class RunHistory:
    """A run's epochs as ``metrics.jsonl`` holds them, and the options it was trained with.

    Attributes:
        name: the run folder's name.
        records: one :class:`EpochRecord` per epoch, in order.
        options: the recorded training options (the checkpoint's ``train`` metadata, else
            those of an unfinished run's resume state; empty when neither can be read).
    """

    name: str
    records: list[EpochRecord]
    options: Options = field(default_factory=dict)


#: Fields of an :class:`EpochRecord` that a ``metrics.jsonl`` row may lack (NaN then).
_OPTIONAL_FIELDS = ("lr", "seconds")


def read_history(run_dir: str | Path) -> RunHistory:
    """The per-epoch records of the run in ``run_dir`` (its ``metrics.jsonl``).

    Raises :class:`~flatcli.errors.CheckpointError`, one line naming the folder, when it is
    no run folder, has no ``metrics.jsonl`` (no epoch finished yet), or a row of it is not
    an epoch's record.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not a run folder"
        raise CheckpointError(f"{folder} {what}", hint="give a run folder of flatcli train")
    if not any((folder / name).is_file() for name in (MODEL_FILE, METRICS_FILE, STATE_FILE)):
        raise CheckpointError(
            f"{folder} is not a run folder (no {MODEL_FILE} or {METRICS_FILE})",
            hint="give a run folder of flatcli train",
        )
    path = folder / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {METRICS_FILE}", hint="it is written after each epoch of training"
        )
    names = [f.name for f in fields(EpochRecord)]
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            values = {k: row.get(k, math.nan) if k in _OPTIONAL_FIELDS else row[k] for k in names}
            records.append(
                EpochRecord(int(values.pop("epoch")), **{k: float(v) for k, v in values.items()})
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{path} line {number} is not an epoch's record ({first_line(exc)})"
            ) from None
    if not records:
        raise CheckpointError(
            f"{path} holds no epoch", hint="it is written after each epoch of training"
        )
    return RunHistory(folder.resolve().name, records, _run_options(folder))


def _run_options(folder: Path) -> Options:
    """The training options recorded in ``folder``'s checkpoint or resume state ({} if none)."""
    with contextlib.suppress(CheckpointError, OSError, ValueError):
        if (folder / MODEL_FILE).is_file():
            _, meta = read_metadata(folder / MODEL_FILE)
            train = (meta or {}).get("train")
            return train if isinstance(train, dict) else {}
        if (folder / STATE_FILE).is_file():
            options = load_state_file(folder / STATE_FILE, tensors=False).get("options")
            return options if isinstance(options, dict) else {}
    return {}
