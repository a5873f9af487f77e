"""Frozen configurations: what a command asks the library to do.

The CLI (or a Python caller) builds one of these once; the library reads it and never
sees an option parser. Validation lives here so that every entry point rejects the same
bad values with the same one-line message.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flatcli.errors import CheckpointError, UnknownNameError, UsageError

#: A run's recorded options (:meth:`TrainConfig.recorded`): JSON values by option name.
Options = dict[str, Any]

#: Default learning rate per optimiser (used when ``lr`` is not given).
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}

#: The paper's recipes (Granziol 2020, sec. "Gadam"; Izmailov et al. 2018 for SWA).
#: ``average_from`` is a fraction of the epochs: averaging starts after that fraction of
#: them (epoch ``int(average_from * epochs) + 1``). ``lr_final`` is a fraction of ``lr``.
#: Any other key is a :class:`TrainConfig` field (``epochs``, ``momentum``, ...).
#:
#: ``gadam`` and ``swa`` are short forms for any data set (the averaging learning rate is
#: half the initial one; 0.53 of 300 epochs starts averaging at epoch 160).
#:
#: The ``paper-*`` recipes are the protocol of ``docs/paper.md`` ("The author's setup"):
#: batch 128, 300 epochs, the ``paper`` schedule (``lr`` held for half the budget, linear
#: decay to ``lr_final`` by 90%, then held; budget = the averaging start, else all
#: epochs), ``lr_final`` 0.01 lr, or the averaging learning rate for averaged runs,
#: averaging from epoch 161 of 300 (a fraction 160/300), learning rates and weight
#: decays of VGG16-BN on CIFAR-100. ``flatcli.workflows.protocol`` holds the per-model
#: values paper.md gives for other models and the source of every value (the README's
#: table "Reproducing the paper" lists them; a test holds the two equal).
PAPER_AVERAGE_FROM = 160 / 300
_PAPER_COMMON: dict[str, str | float] = {"epochs": 300, "batch_size": 128, "schedule": "paper"}
_PAPER_SGD: dict[str, str | float] = {
    **_PAPER_COMMON,
    "optimizer": "sgd",
    "momentum": 0.9,
    "lr": 0.1,
}
_PAPER_ADAM: dict[str, str | float] = {**_PAPER_COMMON, "lr": 5e-4}
RECIPES: dict[str, dict[str, str | float]] = {
    "gadam": {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.25,
        "schedule": "paper",
        "average_from": 0.53,
        "lr_final": 0.5,
    },
    "swa": {
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "l2": 5e-4,
        "schedule": "paper",
        "average_from": 0.53,
        "lr_final": 0.5,
    },
    "paper-sgd": {**_PAPER_SGD, "lr_final": 0.01},
    "paper-sgd-l2": {**_PAPER_SGD, "l2": 5e-4, "lr_final": 0.01},
    "paper-swa": {**_PAPER_SGD, "l2": 5e-4, "average_from": PAPER_AVERAGE_FROM, "lr_final": 0.5},
    "paper-adam": {**_PAPER_ADAM, "optimizer": "adam", "lr_final": 0.01},
    "paper-adamw": {**_PAPER_ADAM, "optimizer": "adamw", "weight_decay": 0.25, "lr_final": 0.01},
    "paper-gadam": {
        **_PAPER_ADAM,
        "optimizer": "adamw",
        "weight_decay": 0.25,
        "average_from": PAPER_AVERAGE_FROM,
        "lr_final": 0.5,
    },
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and is recorded in its checkpoint)."""

    dataset: str = "digits"
    model: str = "logreg"
    model_kwargs: dict[str, object] = field(default_factory=dict)
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
    #: Data parallel only: BatchNorm over the global batch (torch.nn.SyncBatchNorm, CUDA) instead of each rank's part.
    sync_bn: bool = False
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
                f"--average-from {self.average_from} is outside the run's epochs 1..{self.epochs}"
            )
        if self.train_samples is not None:
            _positive("train samples", self.train_samples)
        if self.overwrite and self.resume:
            raise UsageError(
                "--overwrite and --resume contradict each other",
                hint="--resume continues the run in --out, --overwrite replaces it",
            )

    @property
    def final_lr(self) -> float:
        """The learning rate a decaying schedule ends at (default 1% of ``lr``)."""
        return self.lr_final if self.lr_final is not None else 0.01 * self.lr

    def recorded(self) -> Options:
        """The options a checkpoint records: all but where and how the run was written."""
        d = asdict(self)
        for key in ("out", "overwrite", "resume", "data_dir", "download"):
            d.pop(key)
        return d


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{name} must be positive, got {value}")


def make_train_config(recipe: str | None = None, **given: object) -> TrainConfig:
    """Build a :class:`TrainConfig` from explicitly given options, a recipe and defaults.

    Options that are ``None`` count as not given. Precedence: explicit option, then the
    recipe's value, then the optimiser's default learning rate, then the field default.
    """
    # option values of every type, each checked by TrainConfig.__post_init__
    chosen: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    values: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise UnknownNameError(
                f"unknown recipe {recipe!r}", hint=f"choose one of: {', '.join(RECIPES)}"
            )
        values.update(RECIPES[recipe])
        epochs = chosen.get("epochs", values.get("epochs", TrainConfig.epochs))
        if "average_from" in values:  # a fraction of the epochs (1e-9: 160/300 * 300 is 160)
            start = int(values["average_from"] * epochs + 1e-9) + 1
            values["average_from"] = max(1, min(epochs, start))
        lr = chosen.get("lr", values["lr"])
        values["lr_final"] = values["lr_final"] * lr
        values["recipe"] = recipe
    values.update(chosen)
    if "lr" not in values:
        values["lr"] = DEFAULT_LR.get(
            values.get("optimizer", TrainConfig.optimizer), TrainConfig.lr
        )
    if "out" in values:
        values["out"] = Path(values["out"])
    return TrainConfig(**values)


#: Options that say where and how a run is written or read, not what the run is.
LOCATION_OPTIONS = ("out", "overwrite", "resume", "data_dir", "download", "device")


def resume_config(
    stored: Options | None, recipe: str | None = None, **given: object
) -> TrainConfig:
    """The configuration that continues a run whose recorded options are ``stored``.

    ``given`` are the options given now (``None``: not given). Each given option must
    equal the run's (so ``--resume`` alone continues it as it was); ``epochs`` may
    differ, and :func:`flatcli.workflows.training.train` checks that the epochs already run are
    unaffected. ``stored`` None (a state saved before options were recorded) falls back
    to :func:`make_train_config`. Raises a UsageError naming both values of each
    contradiction.
    """
    chosen: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    location = {k: chosen.pop(k) for k in LOCATION_OPTIONS if k in chosen}
    location["resume"] = True
    if stored is None:
        return make_train_config(recipe, **chosen, **location)
    # The run's device is kept unless another is given (a run may move, e.g. to a GPU).
    values = {
        k: v
        for k, v in stored.items()
        if k in TrainConfig.__dataclass_fields__ and (k == "device" or k not in LOCATION_OPTIONS)
    }
    problems: list[str] = []
    if recipe is not None and recipe != stored.get("recipe"):
        problems.append(contradiction("recipe", recipe, stored.get("recipe")))
    stored_kwargs = stored.get("model_kwargs") or {}
    for key, value in (chosen.pop("model_kwargs", None) or {}).items():
        if stored_kwargs.get(key) != value:
            problems.append(contradiction(key, value, stored_kwargs.get(key, "(none)")))
    epochs = chosen.pop("epochs", None)
    for key, value in chosen.items():
        if key in values and values[key] != value:
            problems.append(contradiction(key, value, values[key]))
    if problems:
        raise UsageError(
            "; ".join(problems), hint="--resume alone continues the run with its own options"
        )
    if epochs is not None:
        values["epochs"] = epochs
    try:
        return TrainConfig(**{**values, **location})
    except (TypeError, ValueError) as exc:  # a hand-edited state: its options are not a config
        raise CheckpointError(
            f"{location.get('out', 'the run')}: the run's recorded options are malformed ({exc})",
            hint="start the run again with --overwrite",
        ) from None


def contradiction(key: str, given: object, stored: object) -> str:
    """``--lr 0.5 contradicts the run's lr 0.05``."""
    return f"--{key.replace('_', '-')} {_show(given)} contradicts the run's {key} {_show(stored)}"


def _show(value: object) -> str:
    return (
        "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


# --- measuring -----------------------------------------------------------------------

#: The measures of ``flatcli sharpness``, in report order: the names of the registry
#: ``flatcli.analysis.measures.MEASURES`` (kept here so that the command line's help and option
#: checks need no torch; a test holds the two equal).
MEASURE_NAMES: tuple[str, ...] = (
    "lambda_max",
    "lambda_min",
    "trace",
    "frobenius",
    "density",
    "lambda_max_normalised",
    "trace_normalised",
    "adaptive_sharpness",
    "relative_flatness",
)
DTYPE_NAMES = ("float32", "float64")
#: BatchNorm statistics: running ("eval"), per batch of ``bn_batch_size`` ("batch"), whole set ("full").
BN_MODES = ("eval", "batch", "full")
#: ``flatcli.curvature.operator.Curvature``'s names, torch-free (a test keeps them equal)
CURVATURE_NAMES = ("hessian", "ggn")
#: The batch that defines the matrix with ``bn_mode="batch"`` unless given
#: (``flatcli.curvature.operator.DEFAULT_BATCH``; a test holds the two equal).
BN_BATCH = 1024


#: The SLQ density draws its probes from ``seed + DENSITY_SEED_OFFSET``: a stream of its
#: own. Lanczos and Hutch++ draw their first vectors from a generator seeded with ``seed``
#: itself; stochastic Lanczos quadrature seeded the same would start from the same draws,
#: so the density's errors would not be independent of lambda_max's and the trace's.
#: (2, so that densities reproduce the reports made before the offset had a name.)
DENSITY_SEED_OFFSET = 2


@dataclass(frozen=True)
class SharpnessConfig:
    """What to measure and how (every field is part of the cache key).

    The fields are flat (they are the keyword arguments of :func:`flatcli.sharpness`, the
    options of ``flatcli sharpness`` and the keys of its JSON), in these groups:

    * what: ``measures``; ``exact`` (dense eigendecomposition instead of the
      estimators, small models only); ``per_layer`` (each layer's diagonal block too).
    * data: ``split`` and ``samples`` (a fixed subset) of a checkpoint's own data set.
    * the matrix and how it is applied: ``curvature`` (Hessian or generalised Gauss-Newton),
      ``bn_mode`` (BatchNorm statistics; ``bn_batch_size`` is derived from it),
      ``include_l2`` (add the run's coupled L2 term), ``dtype``, ``batch_size`` and
      ``memory_gb`` (the batches of each Hessian-vector product).
    * Lanczos (``lambda_max``, ``lambda_min``): ``tol``, ``max_iter``.
    * Hutch++ (``trace``, ``frobenius``): ``probes``, ``target_stderr``.
    * SLQ (``density``): ``density_iterations``, ``density_probes``.
    * adaptive sharpness: ``rho``, ``sharpness_samples``, ``logit_normalise``.
    * ``seed``: every estimator's random draws (the density's from
      ``seed + DENSITY_SEED_OFFSET``).
    """

    measures: tuple[str, ...] = ("lambda_max", "trace", "frobenius")
    split: str = "train"
    samples: int | None = None
    batch_size: int | None = (
        None  # None: automatic (memory_bounded); 1024 with bn_mode "batch", N with "full"
    )
    memory_gb: float = 2.0
    curvature: str = "hessian"
    bn_mode: str = "eval"
    include_l2: bool = False
    exact: bool = False
    tol: float = 1e-4
    max_iter: int = 100
    probes: int = 99
    target_stderr: float | None = None  # relative; trace/Frobenius add probes until met
    density_iterations: int = 64
    density_probes: int = 8
    rho: float = 0.05
    sharpness_samples: int = 64
    logit_normalise: bool = False
    seed: int = 0
    dtype: str = "float32"
    per_layer: bool = False
    # The batch whose statistics define the matrix with bn_mode "batch" (the loss is the
    # sample-weighted sum over batches of this size, each normalised by its own mean and
    # variance): batch_size, else BN_BATCH; never a memory heuristic's. None in the
    # other modes ("full": one batch of every measured sample). Derived, in the cache key.
    bn_batch_size: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.measures if m not in MEASURE_NAMES]
        if unknown or not self.measures:
            raise UnknownNameError(
                f"unknown measure {', '.join(unknown) or '(none given)'}",
                hint=f"choose from: {', '.join(MEASURE_NAMES)}",
            )
        if self.dtype not in DTYPE_NAMES:
            raise UnknownNameError(f"unknown dtype {self.dtype!r}", hint="use float32 or float64")
        if self.split not in ("train", "test"):
            raise UnknownNameError(f"unknown split {self.split!r}", hint="use train or test")
        if not self.rho > 0:
            raise UsageError(f"rho must be positive, got {self.rho}")
        for name in (
            "max_iter",
            "probes",
            "density_iterations",
            "density_probes",
            "sharpness_samples",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be positive")
        # tol >= 1 (or inf) accepts any Ritz value after one step: not a tolerance at all
        if not (0 < self.tol < 1):
            raise UsageError(f"tol must lie in (0, 1), got {self.tol}", hint="e.g. --tol 1e-4")
        if not (math.isfinite(self.memory_gb) and self.memory_gb > 0):
            raise UsageError(f"memory-gb must be a positive number, got {self.memory_gb}")
        if not math.isfinite(self.rho):
            raise UsageError(f"rho must be finite, got {self.rho}")
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"samples must be positive, got {self.samples}")
        stochastic_trace = {"trace", "frobenius", "trace_normalised"} & set(self.measures)
        if (
            stochastic_trace and not self.exact and self.probes < 4
        ):  # checked here, not after other measures
            raise UsageError(
                f"probes must be at least 4 for {', '.join(sorted(stochastic_trace))}, got {self.probes}",
                hint="block Krylov Hutch++ builds a subspace and samples the remainder; "
                "fewer than 13 give a standard error marked not converged",
            )
        if "adaptive_sharpness" in self.measures and self.sharpness_samples < 2:
            raise UsageError(
                f"sharpness-samples must be at least 2 for a standard error, got {self.sharpness_samples}"
            )
        if self.target_stderr is not None and not self.target_stderr > 0:
            raise UsageError(f"target-stderr must be positive, got {self.target_stderr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError("batch size must be positive")
        if self.curvature not in CURVATURE_NAMES:
            raise UnknownNameError(
                f"unknown curvature {self.curvature!r}", hint=f"use {', '.join(CURVATURE_NAMES)}"
            )
        if self.bn_mode not in BN_MODES:
            raise UnknownNameError(
                f"unknown BatchNorm mode {self.bn_mode!r}", hint=f"use {', '.join(BN_MODES)}"
            )
        object.__setattr__(
            self,
            "bn_batch_size",
            (self.batch_size or BN_BATCH) if self.bn_mode == "batch" else None,
        )

    def key(self) -> str:
        """Every setting (the derived ones included) as canonical JSON."""
        return json.dumps(asdict(self), sort_keys=True)


# --- comparing runs ------------------------------------------------------------------

#: Measures ``flatcli compare`` reports by default: the paper's and the scale-aware ones.
DEFAULT_COMPARE_MEASURES: tuple[str, ...] = (
    "lambda_max",
    "trace",
    "frobenius",
    "lambda_max_normalised",
    "trace_normalised",
    "adaptive_sharpness",
    "relative_flatness",
)
#: Sharpness differences within this many combined uncertainties are ties
#: (:func:`flatcli.analysis.verdicts.verdict`).
TIE_SIGMAS = 2.0
#: A run's test accuracy, as the verdicts judge it, is the mean over its last
#: ``ACCURACY_EPOCHS`` epochs, and the standard deviation of those epochs its noise
#: (:func:`flatcli.analysis.seeds.run_accuracy`): a final epoch is one draw of a number
#: that still swings at a constant learning rate.
ACCURACY_EPOCHS = 5
#: Test accuracy differences within this many noise standard deviations are ties
#: (:func:`flatcli.analysis.verdicts.accuracy_tie`).
ACCURACY_SIGMAS = 1.0


# --- the rank bound ------------------------------------------------------------------

#: Fractions of lambda_max above which the exact effective rank counts eigenvalues.
RANK_FRACTIONS: tuple[float, ...] = (1e-2, 1e-3)
#: The SLQ estimate of the effective rank counts |lambda| above this fraction of
#: max |lambda|, from ``RANK_PROBES`` probes of ``RANK_ITERATIONS`` Lanczos steps drawn
#: from ``RANK_SEED``.
RANK_FRACTION = 1e-2
RANK_PROBES = 8
RANK_ITERATIONS = 80
RANK_SEED = 0
#: Largest P for which the ranks are exact (dense Hessian and GGN matrices: two P x P
#: float64 matrices plus an eigensolver copy, 3 * 8 * 4096^2 B = 384 MiB); above it an
#: SLQ estimate, unless exact ranks are asked for (then up to twice this).
RANK_MAX_PARAMS = 4096


# --- the demo ------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and measures, and where its runs are kept (``out/MODEL-VARIANT``;
    with ``seeds`` > 1 the further seeds' runs are ``out/MODEL-VARIANT-sSEED``).

    ``measure_samples`` and ``probes`` set the measurements (sharpness, rank, sweep);
    ``sweep_scales`` the factors of the weight-scaling sweep of the first model's ``sgd``
    run; ``overwrite`` allows retraining a run made with other settings.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    models: tuple[str, ...] = ("logreg", "mlp", "cnn")
    epochs: int = 60
    train_samples: int | None = None
    measure_samples: int | None = None
    probes: int = 99
    sweep_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    out: Path = Path("runs/demo")
    seed: int = 0
    #: Runs per variant, seeds ``seed .. seed + seeds - 1``; contrasts are judged arm
    #: against arm (the mean over the seeds and its standard error).
    seeds: int = 1
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.seeds, bool) or self.seeds < 1:
            raise UsageError(f"--seeds must be a positive integer, got {self.seeds}")

    @classmethod
    def reduced(cls, **changes: Any) -> DemoConfig:
        """A small version for tests: a few epochs on a subset, cheap estimators;
        ``changes`` are fields set over it.
        """
        small = cls(
            models=("logreg", "mlp"),
            epochs=3,
            train_samples=300,
            measure_samples=300,
            probes=12,
            sweep_scales=(1.0, 4.0),
        )
        return replace(small, **changes)
