"""``flatcli demo --protocol paper``: the paper's experiment, planned, timed, trained, measured.

The protocol of ``docs/paper.md`` ("The author's setup"): each protocol model (VGG-16
without and with BatchNorm, PreResNet-110, WRN-28-10 without dropout) trained with each
arm's ``paper-*`` recipe (:data:`flatcli.config.RECIPES`), then measured as the authors
measured: the Hessian of the mean cross-entropy without the L2 term, over the whole
training set without augmentation, BatchNorm in batch-statistics mode, lambda_max by
Lanczos, the trace by Hutch++ and the spectral density by stochastic Lanczos quadrature.
The paper's published numbers (:mod:`flatcli.analysis.paper`) are set beside flatcli's.

Three steps, so that a user sees what will happen before it happens:

1. :func:`plan_protocol`: every run (model x arm: folder, recipe, learning rate, weight
   decay, epochs, averaging start, and the source of each value) is built and checked
   (names, model arguments, folders that hold other runs) before anything trains.
2. :func:`estimate_plan`: a short timed warm-up per model on the current device, on
   random tensors of the data's shape with the real model (a few training steps through
   :func:`flatcli.workflows.training.train_one_epoch`, a few Hessian-vector products
   through the real operator), scaled to epochs x batches plus the measurements.
3. :func:`run_protocol`: each run trained (a finished run with the same settings is
   reused, a stopped one continues from its resume state) and measured (results cached
   in its ``sharpness.json``); the command draws each density
   (:func:`flatcli.report.protocol.protocol_figures`).

The time estimate is linear scaling: training costs (batches per epoch) x (seconds per
batch) plus the test set's forward passes each epoch; a measurement costs (data passes)
x (seconds per pass over N samples), counting every Lanczos step up to ``max_iter``
(an upper bound: Lanczos stops earlier when it converges), ``probes`` trace vectors and
``density_iterations`` passes of ``density_probes`` vectors. On the CPU the warm-up
times a smaller batch and scales by samples (CPU time is close to linear in the batch);
on a GPU it times the real batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from flatcli.analysis.paper import PublishedRun, published_run
from flatcli.analysis.progress import ProgressCallback
from flatcli.analysis.sharpness_report import Density, SharpnessReport
from flatcli.config import (
    SharpnessConfig,
    TrainConfig,
    make_train_config,
)
from flatcli.curvature.operator import CurvatureOperator
from flatcli.curvature.results import Estimate
from flatcli.distributed import resolve_device
from flatcli.errors import RunExistsError, UnknownNameError
from flatcli.models import build_model, resolve_kwargs
from flatcli.workflows.checkpoint import MODEL_FILE, STATE_FILE, load_state_file, read_metadata
from flatcli.workflows.data import DatasetSpec, get_spec
from flatcli.workflows.demo import ensure_run, existing_run
from flatcli.workflows.sharpness import checkpoint_sharpness
from flatcli.workflows.source import CheckpointSource
from flatcli.workflows.training import OPTIMIZERS, TrainCallbacks, train, train_one_epoch

__all__ = [
    "ARMS",
    "OVERRIDES",
    "PROTOCOL_MODELS",
    "RECIPE_SOURCES",
    "SPLIT_SIZES",
    "ModelEstimate",
    "Override",
    "PlannedRun",
    "ProtocolConfig",
    "ProtocolModel",
    "ProtocolPlan",
    "ProtocolResult",
    "ProtocolRow",
    "estimate_plan",
    "plan_protocol",
    "run_protocol",
]

#: The arms of the protocol and their recipes (docs/paper.md, "Published spectra").
ARMS: dict[str, str] = {
    "sgd": "paper-sgd",
    "sgd-l2": "paper-sgd-l2",
    "swa": "paper-swa",
    "adam": "paper-adam",
    "adamw": "paper-adamw",
    "gadam": "paper-gadam",
}

#: Where each recipe's values come from ("flatcli's choice" where docs/paper.md is silent).
#: The README's table "Reproducing the paper" repeats these (a test holds them equal).
RECIPE_SOURCES: dict[str, str] = {
    "paper-sgd": "paper.md: SGD lr 0.1 (VGG16-BN), no wd, schedule, batch 128, 300 epochs",
    "paper-sgd-l2": "paper.md: as paper-sgd, L2 5e-4 (table: SGD, wd 5e-4)",
    "paper-swa": "paper.md: lr 0.1, averaging lr 0.05, from epoch 161; L2 5e-4 flatcli's choice",
    "paper-adam": "lr 5e-4 flatcli's choice (Gadam's lr); no wd: paper.md table",
    "paper-adamw": "paper.md: AdamW, decoupled wd 0.25; lr 5e-4 (Gadam's, VGG16-BN)",
    "paper-gadam": "paper.md: VGG16-BN lr 5e-4, averaging lr 2.5e-4, wd 0.25, from epoch 161",
}


@dataclass(frozen=True)
class ProtocolModel:
    """A model of the protocol: a zoo model with fixed arguments."""

    zoo: str
    kwargs: dict[str, object]
    label: str


#: The protocol's models (docs/paper.md, "The author's setup": VGG-16 with and without
#: BatchNorm, PreResNet-110, WideResNet-28-10 without dropout).
PROTOCOL_MODELS: dict[str, ProtocolModel] = {
    "vgg16": ProtocolModel("vgg16", {"batchnorm": False}, "VGG-16, no BatchNorm"),
    "vgg16-bn": ProtocolModel("vgg16", {"batchnorm": True}, "VGG-16 with BatchNorm"),
    "preresnet": ProtocolModel("preresnet", {"depth": 110}, "PreResNet-110"),
    "wrn": ProtocolModel("wrn", {"depth": 28, "widen": 10, "dropout": 0.0}, "WRN-28-10"),
}


@dataclass(frozen=True)
class Override:
    """Per-model values over an arm's recipe (options of ``make_train_config``) and their source."""

    values: dict[str, float]
    source: str


#: Per-model values where they differ from the recipes' VGG16-BN values. Where
#: docs/paper.md gives none (WRN-28-10, and the arms it does not tune) the recipe's
#: values are used; that is flatcli's choice, not the paper's.
OVERRIDES: dict[tuple[str, str], Override] = {
    ("preresnet", "gadam"): Override(
        {"lr": 1e-3, "weight_decay": 0.1}, "paper.md: PreResNet-110 Gadam lr 1e-3, wd 0.1"
    ),
    ("preresnet", "adamw"): Override(
        {"lr": 1e-3}, "lr 1e-3 flatcli's choice (PreResNet-110's Gadam lr); wd 0.25: paper.md table"
    ),
    ("preresnet", "adam"): Override(
        {"lr": 1e-3}, "lr 1e-3 flatcli's choice (PreResNet-110's Gadam lr)"
    ),
    **{
        ("vgg16", arm): Override(
            {"lr": 0.05}, "lr 0.05 flatcli's choice (no BatchNorm: half VGG16-BN's lr)"
        )
        for arm in ("sgd", "sgd-l2", "swa")
    },
}

#: Samples in the training and test splits (what the estimate scales to without loading
#: the data: the published sizes of the torchvision sets; digits: 80/20 of 1,797).
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "digits": (1437, 360),
    "mnist": (60000, 10000),
    "fashion-mnist": (60000, 10000),
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
}

#: The warm-up: timed training steps and Hessian-vector products (after one untimed of each).
WARMUP_STEPS = 3
#: On the CPU the warm-up times batches of this many samples and scales by samples.
CPU_WARMUP_BATCH = 16
#: The batch of the timed Hessian-vector products on a GPU.
GPU_HVP_BATCH = 256
#: Samples per forward pass when a run evaluates (``flatcli.workflows.training.evaluate``).
EVAL_BATCH = 1024


@dataclass(frozen=True)
class ProtocolConfig:
    """What the protocol trains and measures, and where (``out/MODEL-ARM``).

    ``epochs`` None: the recipes' (300). ``train_samples`` / ``samples``: train and
    measure on a deterministic subset (for quick looks and tests; the paper uses all);
    :attr:`measured_samples` says which.
    ``max_iter``, ``probes``, ``density_iterations`` and ``density_probes`` are the
    estimators' settings (Lanczos steps, Hutch++ vectors, SLQ steps and probes);
    ``memory_gb`` bounds a Hessian-vector product's memory (a batch of BatchNorm statistics
    that needs more is refused, never cut: PreResNet-110 needs about 2 GiB per 64 images).
    ``estimate``: time a warm-up per model before training.
    """

    dataset: str = "cifar100"
    data_dir: str | None = None
    models: tuple[str, ...] = tuple(PROTOCOL_MODELS)
    arms: tuple[str, ...] = tuple(ARMS)
    epochs: int | None = None
    train_samples: int | None = None
    samples: int | None = None
    max_iter: int = SharpnessConfig.max_iter
    probes: int = SharpnessConfig.probes
    density_iterations: int = SharpnessConfig.density_iterations
    density_probes: int = SharpnessConfig.density_probes
    memory_gb: float = SharpnessConfig.memory_gb
    out: Path = Path("runs/paper")
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    estimate: bool = True

    @property
    def measured_samples(self) -> int | None:
        """The training samples measured: ``samples``, else those trained on (None: all).

        ``train_samples`` and ``samples`` cut their subsets from one fixed permutation
        (:func:`flatcli.workflows.data.subset_indices`), so a run is measured on the very
        samples it was trained on unless ``samples`` says otherwise.
        """
        return self.samples if self.samples is not None else self.train_samples

    def sharpness(self) -> SharpnessConfig:
        """The measurements: lambda_max, trace and density, batch statistics, no L2 term."""
        return SharpnessConfig(
            measures=("lambda_max", "trace", "density"),
            samples=self.measured_samples,
            bn_mode="batch",
            max_iter=self.max_iter,
            probes=self.probes,
            density_iterations=self.density_iterations,
            density_probes=self.density_probes,
            memory_gb=self.memory_gb,
            seed=self.seed,
        )


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: its training settings and what will happen to it.

    ``status``: ``new`` (trains), ``finished`` (reused), ``stopped`` (continues after
    ``done`` epochs) or ``replace`` (``overwrite``: trained again). ``source`` says where
    the values come from.
    """

    model: str
    arm: str
    config: TrainConfig
    source: str
    status: str = "new"
    done: int = 0

    @property
    def name(self) -> str:
        """``MODEL-ARM``, the run's folder under the protocol's ``out``."""
        return f"{self.model}-{self.arm}"

    @property
    def out(self) -> Path:
        """The run folder."""
        assert self.config.out is not None  # plan_protocol sets it
        return self.config.out


@dataclass(frozen=True)
class ModelEstimate:
    """The warm-up of one protocol model and what it predicts for one of its runs.

    ``batch_s``: seconds per training batch (of the run's batch size); ``forward_s`` and
    ``hvp_s``: seconds per sample of an evaluation forward pass and of one
    Hessian-vector product; ``block_hvp_s``: seconds per sample and vector of a block of
    ``density_probes`` products. ``epoch_s`` and ``measure_s``: one epoch and one run's
    measurements at the plan's sizes.
    """

    model: str
    device: str
    num_params: int
    warmup_batch: int
    batch_s: float
    forward_s: float
    hvp_s: float
    block_hvp_s: float
    epoch_s: float
    measure_s: float


@dataclass(frozen=True)
class ProtocolPlan:
    """Every run of the protocol, checked, and (when timed) the estimates per model."""

    config: ProtocolConfig
    runs: list[PlannedRun]
    train_size: int
    test_size: int
    measure_size: int
    estimates: dict[str, ModelEstimate] = field(default_factory=dict)

    def seconds(self, run: PlannedRun) -> float | None:
        """The estimated seconds of ``run``: its remaining epochs and its measurements."""
        est = self.estimates.get(run.model)
        if est is None:
            return None
        remaining = 0 if run.status == "finished" else run.config.epochs - run.done
        return remaining * est.epoch_s + est.measure_s

    @property
    def total_seconds(self) -> float | None:
        """The estimate of the whole protocol (None when not timed)."""
        if not self.estimates:
            return None
        return sum(self.seconds(r) or 0.0 for r in self.runs)


@dataclass(frozen=True)
class ProtocolRow:
    """One measured run: its sharpness report, its test accuracy and the paper's numbers."""

    model: str
    arm: str
    recipe: str
    run: Path
    report: SharpnessReport
    test_accuracy: float | None
    published: PublishedRun | None

    @property
    def name(self) -> str:
        """``MODEL-ARM``."""
        return f"{self.model}-{self.arm}"

    @property
    def lambda_max(self) -> Estimate:
        """The largest eigenvalue of the Hessian."""
        return self._estimate("lambda_max")

    @property
    def trace(self) -> Estimate:
        """The Hessian's trace."""
        return self._estimate("trace")

    @property
    def density(self) -> Density:
        """The spectral density (SLQ)."""
        value = self.report.measures["density"]
        assert isinstance(value, Density)  # the protocol measures it as a density
        return value

    @property
    def trace_per_param(self) -> float:
        """Tr(H) / P, the paper's normalisation of the trace."""
        return self.trace.value / self.report.num_params

    def _estimate(self, name: str) -> Estimate:
        value = self.report.measures[name]
        assert isinstance(value, Estimate)  # lambda_max and trace are estimates
        return value


@dataclass(frozen=True)
class ProtocolResult:
    """The plan that ran, one row per run, and the wall-clock seconds."""

    plan: ProtocolPlan
    rows: list[ProtocolRow]
    seconds: float

    def row(self, model: str, arm: str) -> ProtocolRow | None:
        """The row of ``model``'s run ``arm``, if it ran."""
        return next((r for r in self.rows if r.model == model and r.arm == arm), None)


def _checked_names(given: tuple[str, ...], known: dict[str, object], what: str) -> None:
    unknown = [n for n in given if n not in known]
    if unknown or not given:
        raise UnknownNameError(
            f"unknown protocol {what} {', '.join(map(repr, unknown))}"
            if unknown
            else f"no protocol {what} given",
            hint=f"choose from: {', '.join(known)}",
        )


def plan_protocol(config: ProtocolConfig) -> ProtocolPlan:
    """Every run of the protocol with its settings, checked before anything trains.

    Refuses unknown models, arms and data sets, bad model arguments, and a run folder
    that holds a run (finished or stopped) made with other settings unless ``overwrite``.
    """
    spec = get_spec(config.dataset)
    config.sharpness()  # the measurement settings are refused now, not after the warm-up
    _checked_names(config.models, dict(PROTOCOL_MODELS), "model")
    _checked_names(config.arms, dict(ARMS), "arm")
    runs: list[PlannedRun] = []
    for name in config.models:
        pm = PROTOCOL_MODELS[name]
        kwargs = resolve_kwargs(pm.zoo, **pm.kwargs)
        for arm in config.arms:
            recipe = ARMS[arm]
            override = OVERRIDES.get((name, arm))
            tc = make_train_config(
                recipe,
                dataset=config.dataset,
                data_dir=config.data_dir,
                model=pm.zoo,
                model_kwargs=kwargs,
                epochs=config.epochs,
                train_samples=config.train_samples,
                seed=config.seed,
                device=config.device,
                out=config.out / f"{name}-{arm}",
                **(override.values if override else {}),
            )
            source = RECIPE_SOURCES[recipe] + (f"; {override.source}" if override else "")
            runs.append(_with_status(PlannedRun(name, arm, tc, source), config.overwrite))
    full, test_size = SPLIT_SIZES[spec.name]
    train_size = min(full, config.train_samples or full)
    measure_size = min(full, config.measured_samples or full)
    return ProtocolPlan(config, runs, train_size, test_size, measure_size)


def _with_status(run: PlannedRun, overwrite: bool) -> PlannedRun:
    """``run`` with what its folder holds: nothing, a finished run or a stopped one."""
    folder = run.out
    if (folder / MODEL_FILE).is_file():
        if overwrite:
            return replace(run, status="replace")
        existing_run(run.config, overwrite=False)  # True for the same run, refuses another
        return replace(run, status="finished", done=run.config.epochs)
    if (folder / STATE_FILE).is_file():
        if overwrite:
            return replace(run, status="replace")
        state = load_state_file(folder / STATE_FILE, tensors=False)
        stored = state.get("options")
        if isinstance(stored, dict):
            defaults = {f.name: f.default for f in fields(TrainConfig)}
            other = [
                k
                for k, v in run.config.recorded().items()
                if k not in ("epochs", "device", "model_kwargs", "augment")
                and stored.get(k, defaults.get(k)) != v
            ]
            if other:
                raise RunExistsError(
                    f"{folder} holds a stopped run made with other settings ({', '.join(other)})",
                    hint="pass --overwrite to train it again, or --out to use another folder",
                )
        done = state.get("epoch")
        return replace(run, status="stopped", done=done if isinstance(done, int) else 0)
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(
    fn: Callable[[], object], device: torch.device, repeats: int, warm: bool = True
) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls (after one untimed call if ``warm``)."""
    if warm:
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _warm_up(
    run: PlannedRun, spec: DatasetSpec, device: torch.device, plan: ProtocolPlan
) -> ModelEstimate:
    """Time ``run``'s model on random tensors of the data's shape (module doc)."""
    tc, cfg = run.config, plan.config
    torch.manual_seed(cfg.seed)
    model = build_model(
        tc.model, input_shape=spec.input_shape, num_classes=spec.num_classes, **tc.model_kwargs
    ).to(device)
    batch = min(tc.batch_size, CPU_WARMUP_BATCH) if device.type == "cpu" else tc.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(batch * WARMUP_STEPS, *spec.input_shape, generator=gen).to(device)
    y = torch.randint(0, spec.num_classes, (len(x),), generator=gen).to(device)
    optimizer = OPTIMIZERS[tc.optimizer](list(model.parameters()), tc)
    augment = spec.augment_by_default if tc.augment is None else tc.augment
    step_tc = replace(tc, batch_size=batch)
    train_one_epoch(model, optimizer, x[:batch], y[:batch], step_tc, gen, augment)  # untimed

    def steps() -> None:
        train_one_epoch(model, optimizer, x, y, step_tc, gen, augment)

    batch_s = _timed(steps, device, 1, warm=False) / WARMUP_STEPS * tc.batch_size / batch
    model.eval()
    with torch.no_grad():
        forward_s = _timed(lambda: model(x[:batch]), device, WARMUP_STEPS) / batch
    hvp_batch = batch if device.type == "cpu" else GPU_HVP_BATCH
    xs = torch.randn(hvp_batch, *spec.input_shape, generator=gen).to(device)
    ys = torch.randint(0, spec.num_classes, (hvp_batch,), generator=gen).to(device)
    op = CurvatureOperator(model, xs, ys, bn_mode="batch", batch_size=hvp_batch, cache_graph=False)
    p, k = op.num_params, cfg.density_probes
    one = torch.randn(p, 1, generator=gen).to(device)
    block = torch.randn(p, k, generator=gen).to(device)
    hvp_s = _timed(lambda: op.matmat(one), device, WARMUP_STEPS) / hvp_batch
    block_hvp_s = _timed(lambda: op.matmat(block), device, 1, warm=False) / hvp_batch / k

    batches = math.ceil(plan.train_size / tc.batch_size)
    epoch_s = batches * batch_s + plan.test_size * forward_s
    n = plan.measure_size
    passes = cfg.max_iter * hvp_s + (cfg.probes + cfg.density_iterations * k) * block_hvp_s
    measure_s = n * passes + (plan.train_size + plan.test_size) * forward_s
    return ModelEstimate(
        run.model, str(device), p, batch, batch_s, forward_s, hvp_s, block_hvp_s, epoch_s, measure_s
    )


def estimate_plan(plan: ProtocolPlan, on_step: Callable[[str], None] | None = None) -> ProtocolPlan:
    """``plan`` with a timed warm-up of each of its models on the current device."""
    step = on_step or (lambda message: None)
    spec = get_spec(plan.config.dataset)
    device = resolve_device(plan.config.device)
    estimates: dict[str, ModelEstimate] = {}
    for run in plan.runs:
        if run.model not in estimates:
            step(f"timing {run.model} on {device}")
            estimates[run.model] = _warm_up(run, spec, device, plan)
    return replace(plan, estimates=estimates)


def _train(run: PlannedRun, overwrite: bool, progress: ProgressCallback | None) -> None:
    """Train ``run`` as its status says: continue a stopped run, train a new one, reuse a
    finished one; ``progress`` hears the epochs.
    """
    callbacks = TrainCallbacks.ticking(progress, f"training {run.name}")
    if run.status == "stopped":
        train(replace(run.config, resume=True), callbacks)
    elif run.status != "finished":
        ensure_run(run.config, overwrite, callbacks=callbacks)


def _test_accuracy(run: Path) -> float | None:
    """The final model's test accuracy, as training recorded it."""
    _, meta = read_metadata(run / MODEL_FILE)
    metrics = (meta or {}).get("metrics")
    value = metrics.get("test_accuracy") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def run_protocol(
    plan: ProtocolPlan,
    on_step: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> ProtocolResult:
    """Train (or reuse, or continue) and measure every run of ``plan``; ``on_step`` hears
    one line before each stage, ``progress`` the tasks within (each run's epochs, each
    measurement's products).
    """
    step = on_step or (lambda message: None)
    start = time.perf_counter()
    config = plan.config
    sharp = config.sharpness()
    source = CheckpointSource(data_dir=config.data_dir, device=config.device)
    rows: list[ProtocolRow] = []
    for run in plan.runs:
        verb = {"finished": "reusing", "stopped": f"continuing (after epoch {run.done})"}
        step(f"{verb.get(run.status, 'training')} {run.name}")
        _train(run, config.overwrite, progress)
        step(f"measuring {run.name}")
        report = checkpoint_sharpness(run.out, sharp, source, progress=progress)
        rows.append(
            ProtocolRow(
                run.model,
                run.arm,
                run.config.recipe or "",
                run.out,
                report,
                _test_accuracy(run.out),
                published_run(config.dataset, run.model, run.arm),
            )
        )
    return ProtocolResult(plan, rows, time.perf_counter() - start)
