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
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from . import __version__
from .checkpoint import (LAST_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE, atomic_write_text, load_state_file,
                         save_checkpoint, save_state)
from .config import TrainConfig
from .data import augment_batch, get_spec, load_dataset
from .errors import RunExistsError, UsageError, UnknownNameError
from .models import build_model, resolve_kwargs

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
    "cosine": lambda c: lambda epoch: (c.final_lr / c.lr) + (1 - c.final_lr / c.lr) * 0.5 * (
        1 + math.cos(math.pi * min(epoch, c.epochs) / c.epochs)),
    "paper": lambda c: lambda epoch: _paper_factor(
        epoch, (c.average_from - 1) if c.average_from and c.average_from > 1 else c.epochs, c.final_lr / c.lr),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UnknownNameError(f"unknown device {name!r}", hint="use auto, cpu or cuda") from None


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
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on the given data."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    return loss / len(targets), correct / len(targets)


def weight_norm(model: nn.Module) -> float:
    """Euclidean norm of all parameters (buffers excluded)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


def regularised_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], l2: float,
                     weight_decay: float) -> None:
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


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                    targets: torch.Tensor, config: TrainConfig, generator: torch.Generator,
                    augment: bool, on_batch: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """One pass over the data in the order drawn from ``generator``; returns (loss, accuracy).

    The loss and accuracy are running means over the epoch's batches (as seen while
    training, with augmentation).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(targets)
    order = torch.randperm(n, generator=generator).to(inputs.device)
    total_loss = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for b, start in enumerate(range(0, n, config.batch_size)):
        idx = order[start:start + config.batch_size]
        x, y = inputs[idx], targets[idx]
        if augment:
            x = augment_batch(x, generator)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        regularised_step(optimizer, params, config.l2, config.weight_decay)
        total_loss += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        if on_batch is not None:
            on_batch(b, loss.detach())
    return float(total_loss) / n, int(correct) / n


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): a resumed run draws exactly what it would have drawn.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def prepare_run_dir(config: TrainConfig) -> Path:
    """Choose and check the run directory; never clobber a run unless asked."""
    if config.out is None:
        base = Path("runs") / f"{config.dataset}-{config.model}-{config.recipe or config.optimizer}-s{config.seed}"
        out, k = base, 2
        while out.exists() and not config.resume:
            out, k = base.with_name(f"{base.name}-{k}"), k + 1
    else:
        out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"--out {out} is a file, not a run directory")
    has_run = out.is_dir() and any(out.iterdir())
    if config.resume:
        if not (out / STATE_FILE).is_file():
            why = "it is already complete" if (out / MODEL_FILE).is_file() else "it holds no resumable state"
            raise RunExistsError(f"cannot resume {out}: {why}")
    elif has_run:
        if not config.overwrite:
            raise RunExistsError(f"{out} already holds a run", hint="pass --overwrite to replace it, --resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(config: TrainConfig, callbacks: TrainCallbacks | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` and save the run; see the module doc."""
    cb = callbacks or TrainCallbacks()
    device = resolve_device(config.device)
    spec = get_spec(config.dataset)
    kwargs = resolve_kwargs(config.model, **config.model_kwargs)
    train_set = load_dataset(config.dataset, "train", config.data_dir, download=config.download,
                             samples=config.train_samples)
    test_set = load_dataset(config.dataset, "test", config.data_dir, download=config.download)
    out = prepare_run_dir(config)

    x_train, y_train = (t.to(device) for t in train_set.tensors)
    x_test, y_test = test_set.tensors
    torch.manual_seed(config.seed)
    model = build_model(config.model, input_shape=spec.input_shape, num_classes=spec.num_classes, **kwargs).to(device)
    optimizer = OPTIMIZERS[config.optimizer](list(model.parameters()), config) if config.optimizer in OPTIMIZERS \
        else _unknown("optimizer", config.optimizer, OPTIMIZERS)
    if config.schedule not in SCHEDULES:
        _unknown("schedule", config.schedule, SCHEDULES)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[config.schedule](config))
    averaged = AveragedModel(model) if config.average_from else None
    augment = spec.augment_by_default if config.augment is None else config.augment

    history: list[EpochRecord] = []
    start_epoch, elapsed = 0, 0.0
    if config.resume:
        state = load_state_file(out / STATE_FILE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        start_epoch, elapsed = state["epoch"], state["elapsed"]
        history = [EpochRecord(**r) for r in state["history"]]

    n_batches = math.ceil(len(y_train) / config.batch_size)
    cb.on_start(start_epoch, config.epochs, n_batches)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        generator = _epoch_generator(config.seed, epoch)
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout, if any
        lr = optimizer.param_groups[0]["lr"]
        loss, acc = train_one_epoch(model, optimizer, x_train, y_train, config, generator, augment,
                                    lambda b, l, e=epoch: cb.on_batch(e, b, l))
        scheduler.step()
        if averaged is not None and epoch >= config.average_from:
            averaged.update_parameters(model)
        test_loss, test_acc = evaluate(model, x_test, y_test)
        record = EpochRecord(epoch, lr, loss, acc, test_loss, test_acc, time.perf_counter() - t0)
        history.append(record)
        elapsed += record.seconds
        save_state(out / STATE_FILE, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "averaged": averaged.state_dict() if averaged else None,
            "epoch": epoch, "elapsed": elapsed, "history": [r.__dict__ for r in history]})
        atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r.__dict__) + "\n" for r in history))
        cb.on_epoch(record)

    final = model
    base_meta = {
        "arch": {"name": config.model, "kwargs": kwargs},
        "dataset": spec.describe(),
        "train": {**config.recorded(), "model_kwargs": kwargs, "augment": augment,
                  "torch_version": torch.__version__, "flatcli_version": __version__},
    }
    if averaged is not None:
        save_checkpoint(out / LAST_FILE, model, {**base_meta, "metrics": final_metrics(model, x_train, y_train,
                                                                                      x_test, y_test)})
        update_bn([x_train[i:i + config.batch_size] for i in range(0, len(y_train), config.batch_size)],
                  averaged, device=device)
        final = averaged.module
    metrics = final_metrics(final, x_train, y_train, x_test, y_test)
    metrics["epochs"] = config.epochs
    path = save_checkpoint(out / MODEL_FILE, final, {**base_meta, "metrics": metrics})
    (out / STATE_FILE).unlink(missing_ok=True)
    return TrainResult(out, path, {**metrics, "seconds": elapsed}, history)


def final_metrics(model: nn.Module, x_train, y_train, x_test, y_test) -> dict:
    train_loss, train_acc = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return {"train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
            "test_accuracy": test_acc, "weight_norm": weight_norm(model)}


def _unknown(kind: str, name: str, registry: dict):
    raise UnknownNameError(f"unknown {kind} {name!r}", hint=f"choose one of: {', '.join(registry)}")
