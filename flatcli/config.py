"""Frozen configurations: what a command asks the library to do.

The CLI (or a Python caller) builds one of these once; the library reads it and never
sees an option parser. Validation lives here so that every entry point rejects the same
bad values with the same one-line message.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import CheckpointError, UsageError, UnknownNameError

#: Default learning rate per optimiser (used when ``lr`` is not given).
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}

#: The paper's recipes (Granziol 2020, sec. "Gadam"; Izmailov et al. 2018 for SWA).
#: ``average_from`` is a fraction of the epochs: the authors average from epoch 161 of 300.
#: ``lr_final`` is a fraction of ``lr``: the averaging learning rate is half the initial one.
RECIPES: dict[str, dict] = {
    "gadam": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.25, "schedule": "paper",
              "average_from": 0.53, "lr_final": 0.5},
    "swa": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "l2": 5e-4, "schedule": "paper",
            "average_from": 0.53, "lr_final": 0.5},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and is recorded in its checkpoint)."""

    dataset: str = "digits"
    model: str = "logreg"
    model_kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    epochs: int = 20
    batch_size: int = 128
    seed: int = 0
    l2: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    lr_final: float | None = None
    average_from: int | None = None
    augment: bool | None = None
    train_samples: int | None = None
    recipe: str | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    out: Path | None = None
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs)
        _positive("lr", self.lr)
        _positive("batch size", self.batch_size)
        for name in ("l2", "weight_decay", "momentum"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"{name.replace('_', ' ')} must be >= 0, got {value}")
        if self.lr_final is not None and not (self.lr_final > 0 and math.isfinite(self.lr_final)):
            raise UsageError(f"lr-final must be positive, got {self.lr_final}")
        if self.average_from is not None and not 1 <= self.average_from <= self.epochs:
            raise UsageError(
                f"--average-from {self.average_from} is outside the run's epochs 1..{self.epochs}")
        if self.train_samples is not None:
            _positive("train samples", self.train_samples)
        if self.overwrite and self.resume:
            raise UsageError("--overwrite and --resume contradict each other",
                             hint="--resume continues the run in --out, --overwrite replaces it")

    @property
    def final_lr(self) -> float:
        """The learning rate a decaying schedule ends at (default 1% of ``lr``)."""
        return self.lr_final if self.lr_final is not None else 0.01 * self.lr

    def recorded(self) -> dict:
        """The options a checkpoint records: all but where and how the run was written."""
        d = asdict(self)
        for key in ("out", "overwrite", "resume", "data_dir", "download"):
            d.pop(key)
        return d


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{name} must be positive, got {value}")


def make_train_config(recipe: str | None = None, **given) -> TrainConfig:
    """Build a :class:`TrainConfig` from explicitly given options, a recipe and defaults.

    Options that are ``None`` count as not given. Precedence: explicit option, then the
    recipe's value, then the optimiser's default learning rate, then the field default.
    """
    given = {k: v for k, v in given.items() if v is not None}
    values: dict = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise UnknownNameError(f"unknown recipe {recipe!r}", hint=f"choose one of: {', '.join(RECIPES)}")
        values.update(RECIPES[recipe])
        epochs = given.get("epochs", TrainConfig.epochs)
        values["average_from"] = max(1, min(epochs, int(values["average_from"] * epochs) + 1))
        lr = given.get("lr", values["lr"])
        values["lr_final"] = values["lr_final"] * lr
        values["recipe"] = recipe
    values.update(given)
    if "lr" not in values:
        values["lr"] = DEFAULT_LR.get(values.get("optimizer", TrainConfig.optimizer), TrainConfig.lr)
    if "out" in values:
        values["out"] = Path(values["out"])
    return TrainConfig(**values)


#: Options that say where and how a run is written or read, not what the run is.
LOCATION_OPTIONS = ("out", "overwrite", "resume", "data_dir", "download", "device")


def resume_config(stored: dict | None, recipe: str | None = None, **given) -> TrainConfig:
    """The configuration that continues a run whose recorded options are ``stored``.

    ``given`` are the options given now (``None``: not given). Each given option must
    equal the run's (so ``--resume`` alone continues it as it was); ``epochs`` may
    differ, and :func:`flatcli.training.train` checks that the epochs already run are
    unaffected. ``stored`` None (a state saved before options were recorded) falls back
    to :func:`make_train_config`. Raises a UsageError naming both values of each
    contradiction.
    """
    given = {k: v for k, v in given.items() if v is not None}
    location = {k: given.pop(k) for k in LOCATION_OPTIONS if k in given}
    location["resume"] = True
    if stored is None:
        return make_train_config(recipe, **given, **location)
    # The run's device is kept unless another is given (a run may move, e.g. to a GPU).
    values = {k: v for k, v in stored.items()
              if k in TrainConfig.__dataclass_fields__ and (k == "device" or k not in LOCATION_OPTIONS)}
    problems = []
    if recipe is not None and recipe != stored.get("recipe"):
        problems.append(contradiction("recipe", recipe, stored.get("recipe")))
    stored_kwargs = stored.get("model_kwargs") or {}
    for key, value in (given.pop("model_kwargs", None) or {}).items():
        if stored_kwargs.get(key) != value:
            problems.append(contradiction(key, value, stored_kwargs.get(key, "(none)")))
    epochs = given.pop("epochs", None)
    for key, value in given.items():
        if key in values and values[key] != value:
            problems.append(contradiction(key, value, values[key]))
    if problems:
        raise UsageError("; ".join(problems), hint="--resume alone continues the run with its own options")
    if epochs is not None:
        values["epochs"] = epochs
    try:
        return TrainConfig(**{**values, **location})
    except (TypeError, ValueError) as exc:  # a hand-edited state: its options are not a config
        raise CheckpointError(f"{location.get('out', 'the run')}: the run's recorded options are malformed ({exc})",
                              hint="start the run again with --overwrite") from None


def contradiction(key: str, given, stored) -> str:
    """``--lr 0.5 contradicts the run's lr 0.05``."""
    return f"--{key.replace('_', '-')} {_show(given)} contradicts the run's {key} {_show(stored)}"


def _show(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def with_changes(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **changes)
