"""``flatcli compare`` from checkpoints: check the runs, measure them, judge the pairs.

The verdicts themselves are pure functions of the numbers
(:mod:`flatcli.analysis.verdicts`); this module reads the checkpoints and their data,
measures each run (reusing its cached sharpness), and turns the result into the JSON
document of ``flatcli compare --json``.

Each thing compared is an *arm*: one run, or the runs of several seeds of one training
setting (``compare A1,A2,A3 B1,B2,B3``), judged by their mean and its spread
(:func:`flatcli.analysis.seeds.arm`). Arms may hold different numbers of runs (a seed
that crashed does not block the rest; the standard error accounts for n); the runs of
one arm must agree on every training option but the seed. Each run's test accuracy is
the mean over its last epochs (``metrics.jsonl``), or the final model's for an averaged
run or a checkpoint without a history (:func:`flatcli.analysis.seeds.run_accuracy`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from flatcli.analysis.progress import ProgressCallback, Task, cache_note, scoped
from flatcli.analysis.seeds import arm, run_accuracy
from flatcli.analysis.sharpness_report import Density, SharpnessReport
from flatcli.analysis.verdicts import Comparison, RunSummary, compare
from flatcli.config import ACCURACY_EPOCHS, TIE_SIGMAS, Options, SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.errors import CheckpointError, DataError, UsageError
from flatcli.models.factory import resolve_factory
from flatcli.workflows.checkpoint import (
    METRICS_FILE,
    MODEL_FILE,
    CheckpointInfo,
    CheckpointNote,
    load_checkpoint,
    resolve_checkpoint_path,
)
from flatcli.workflows.data import get_spec, load_dataset
from flatcli.workflows.provenance import Provenance, provenance
from flatcli.workflows.sharpness import checkpoint_sharpness, load_point
from flatcli.workflows.source import DEFAULT_SOURCE, CheckpointSource
from flatcli.workflows.training import evaluate, read_history

__all__ = [
    "ArmPaths",
    "accuracy_history",
    "CheckedRun",
    "check_arms",
    "check_runs",
    "compare_checkpoints",
    "comparison_as_dict",
    "comparison_fields",
    "run_densities",
    "summarise",
]


def _judgeable(estimate: Estimate) -> Estimate:
    """The estimate as a verdict reads it: a NaN or infinite uncertainty (e.g. a standard
    error of one sample) is an infinite one that did not converge.
    """
    if math.isfinite(estimate.uncertainty):
        return estimate
    return replace(estimate, uncertainty=math.inf, converged=False)


#: A run folder or checkpoint.
RunPath = str | os.PathLike[str]
#: One arm of a comparison: a run, or the runs of several seeds of one setting.
ArmPaths = RunPath | Sequence[RunPath]

#: Recorded training options that may differ between the runs of one arm.
SEED_OPTIONS = ("seed", "device", "torch_version", "flatcli_version")


def summarise(
    name: str,
    info: CheckpointInfo,
    report: SharpnessReport,
    test_size: int | None,
    history: Sequence[float] = (),
    *,
    last_epochs: int = ACCURACY_EPOCHS,
) -> RunSummary:
    """A :class:`RunSummary` from a checkpoint's metadata and its sharpness report.

    Every measure with an uncertainty and a finite value is kept (a spectral density has
    neither and is left out). ``history`` is the run's test accuracy after each epoch
    (:func:`accuracy_history`): the judged accuracy is the mean of its last ``last_epochs``
    unless the run averaged its iterates (:func:`flatcli.analysis.seeds.run_accuracy`).
    """
    train_opts, metrics = info.train or {}, info.metrics or {}
    averaging = train_opts.get("average_from")
    measures = {
        k: _judgeable(v)
        for k, v in report.measures.items()
        if isinstance(v, Estimate) and math.isfinite(v.value)
    }
    return RunSummary(
        name=name,
        optimizer=str(train_opts.get("optimizer", "?")),
        l2=float(train_opts.get("l2", 0.0) or 0.0),
        weight_decay=float(train_opts.get("weight_decay", 0.0) or 0.0),
        averaging=averaging,
        train_loss=float(metrics.get("train_loss", report.loss)),
        train_accuracy=float(metrics.get("train_accuracy", report.accuracy)),
        test_loss=float(metrics["test_loss"]),
        test_accuracy=float(metrics["test_accuracy"]),
        weight_norm=report.weight_norm,
        measures=measures,
        test_size=test_size,
        accuracy=run_accuracy(
            float(metrics["test_accuracy"]),
            test_size,
            history,
            averaged=averaging is not None,
            last=last_epochs,
        ),
    )


def accuracy_history(info: CheckpointInfo) -> list[float]:
    """The test accuracy after each epoch of the run whose checkpoint ``info`` describes.

    Read from ``metrics.jsonl`` beside a run's ``model.safetensors``; empty for any other
    checkpoint, a folder without that file, or a history that does not end at the
    checkpoint's recorded epochs (the history of another run).
    """
    run_dir = info.run_dir
    if run_dir is None or not (run_dir / METRICS_FILE).is_file():
        return []
    records = read_history(run_dir).records
    epochs = (info.metrics or {}).get("epochs")
    if epochs is not None and records[-1].epoch != epochs:
        return []
    return [r.test_accuracy for r in records]


@dataclass(frozen=True)
class CheckedRun:
    """A checkpoint that exists and loads, and the data sets it was trained and is measured on."""

    name: str
    checkpoint: Path
    trained_on: str
    measured_on: str
    #: The recorded training options (empty for a checkpoint from elsewhere).
    options: Options = field(default_factory=dict)


def check_runs(
    paths: Sequence[str | os.PathLike[str]], source: CheckpointSource = DEFAULT_SOURCE
) -> list[CheckedRun]:
    """Check every run before anything is measured: each checkpoint exists and loads, all
    were trained on ONE data set (else their accuracies say nothing about each other), and
    the data set measured on (``source.dataset``, default the training set) fits each model.
    ``source.model_factory`` (with its ``factory_args`` and ``output``, see
    :func:`~flatcli.workflows.checkpoint.load_checkpoint`) builds every run's model; a
    checkpoint without flatcli metadata names no data set, and is taken as trained on
    ``source.dataset``.

    Raises :class:`~flatcli.errors.CheckpointError` or :class:`~flatcli.errors.DataError`
    (one line naming the run and both data sets); warns when a run is measured on another
    data set (of the same input shape and classes) than it was trained on.
    """
    dataset, model_factory = source.dataset, source.model_factory
    factory = resolve_factory(model_factory, source.factory_args)  # imported once for every run
    checked: list[CheckedRun] = []
    for path in paths:
        ckpt = resolve_checkpoint_path(path)
        with warnings.catch_warnings():  # said again when the run is measured
            warnings.simplefilter("ignore")
            _, info = load_checkpoint(ckpt, model_factory=factory, output=source.output)
        trained = info.dataset.get("name") if isinstance(info.dataset, dict) else None
        if (
            (not trained or not isinstance(trained, str))
            and dataset is not None
            and model_factory is not None
        ):
            trained = dataset  # a file from elsewhere: the data set it is measured on is the only one known
        if not trained or not isinstance(trained, str):
            raise DataError(
                f"{ckpt} does not say which data set it was trained on",
                hint="pass --dataset (compare needs to know the data set of every run)",
            )
        _check_metrics(ckpt, info.metrics if isinstance(info.metrics, dict) else {})
        name = ckpt.parent.name if ckpt.name == MODEL_FILE else Path(ckpt).stem
        while name in [c.name for c in checked]:
            name += "'"
        options = info.train if isinstance(info.train, dict) else {}
        checked.append(CheckedRun(name, ckpt, trained, dataset or trained, options))
        first = checked[0]
        if trained != first.trained_on:
            raise DataError(
                f"cannot compare runs trained on different data sets: {first.name} on "
                f"{first.trained_on}, {name} on {trained}",
                hint="compare runs of one data set",
            )
        measured = dataset or trained
        if measured != trained:
            spec = get_spec(measured)
            shape = tuple(info.dataset.get("input_shape") or ())
            classes = info.dataset.get("num_classes")
            if shape != tuple(spec.input_shape) or classes != spec.num_classes:
                raise DataError(
                    f"{name} was trained on {trained} (input {_shape(shape)}, {classes} classes) and "
                    f"cannot be measured on {measured} (input {_shape(spec.input_shape)}, "
                    f"{spec.num_classes} classes)"
                )
            warnings.warn(
                f"{name} was trained on {trained} but is measured on {measured}",
                UserWarning,
                stacklevel=2,
            )
    return checked


def check_arms(arms: Sequence[Sequence[CheckedRun]]) -> None:
    """The runs of each arm are seeds of one setting: the same recorded training options
    but ``seed`` (and where and with which versions they ran), and no seed twice.

    Raises :class:`~flatcli.errors.UsageError`, one line naming the two runs and the
    first option that differs; a checkpoint without recorded options is not checked.
    """
    for runs in arms:
        known = [r for r in runs if r.options]
        for i, a in enumerate(known):
            for b in known[i + 1 :]:
                keys = sorted((set(a.options) | set(b.options)) - set(SEED_OPTIONS))
                differing = [k for k in keys if a.options.get(k) != b.options.get(k)]
                if differing:
                    k = differing[0]
                    raise UsageError(
                        f"runs of one arm must differ only in their seed: {a.name} has {k} "
                        f"{a.options.get(k)!r}, {b.name} has {k} {b.options.get(k)!r}",
                        hint="A1,A2,A3 is one arm: runs of one training setting with other --seed",
                    )
                if a.options.get("seed") == b.options.get("seed"):
                    raise UsageError(
                        f"{a.name} and {b.name} are the same training (seed "
                        f"{a.options.get('seed')}): an arm needs runs of different seeds"
                    )


def _check_metrics(ckpt: Path, metrics: Mapping[str, object]) -> None:
    """The recorded metrics that :func:`summarise` reads are numbers (accuracies fractions)."""
    for key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy"):
        if key not in metrics:
            continue
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise CheckpointError(f"{ckpt} metadata: metrics.{key} is {value!r}, not a number")
        if key.endswith("accuracy") and not 0 <= value <= 1:
            raise CheckpointError(
                f"{ckpt} metadata: metrics.{key} is {value!r}, not a fraction in [0, 1]"
            )
    if "test_accuracy" in metrics and "test_loss" not in metrics:
        raise CheckpointError(f"{ckpt} metadata: metrics has a test_accuracy but no test_loss")


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape) or "?"


def _arm_paths(paths: Sequence[ArmPaths]) -> list[list[RunPath]]:
    """Each arm as a list of its runs (a plain path is an arm of one run)."""
    return [[p] if isinstance(p, (str, os.PathLike)) else list(p) for p in paths]


def compare_checkpoints(
    paths: Sequence[ArmPaths],
    config: SharpnessConfig,
    source: CheckpointSource = DEFAULT_SOURCE,
    *,
    use_cache: bool = True,
    progress: ProgressCallback | None = None,
    tie_sigmas: float = TIE_SIGMAS,
    last_epochs: int = ACCURACY_EPOCHS,
) -> Comparison:
    """Measure (or reuse cached) sharpness of each checkpoint and compare the arms.

    ``paths`` are the arms: each a run folder or checkpoint, or a sequence of the runs of
    several seeds of one setting (module docstring). ``last_epochs`` is K, the epochs a
    run's test accuracy is averaged over. Every run is loaded as ``source`` says.
    Everything is checked before anything is measured: the options, every checkpoint and
    the data sets (:func:`check_runs`; ``source.dataset`` measures all runs on another
    data set than they were trained on), the arms (:func:`check_arms`), and that the data
    load.
    """
    arms = _arm_paths(paths)
    if len(arms) < 2:
        raise UsageError(f"a comparison needs at least two runs, got {len(arms)}")
    if any(not runs for runs in arms):
        raise UsageError("an arm of the comparison names no run")
    if not (tie_sigmas >= 0 and math.isfinite(tie_sigmas)):
        raise UsageError(f"tie-sigmas must be a finite number >= 0, got {tie_sigmas}")
    if isinstance(last_epochs, bool) or not (isinstance(last_epochs, int) and last_epochs >= 2):
        raise UsageError(
            f"--last-epochs must be an integer >= 2, got {last_epochs}",
            hint="the test accuracy's noise is the spread of these epochs",
        )
    runs = check_runs([p for runs in arms for p in runs], source)
    starts = [sum(len(a) for a in arms[:i]) for i in range(len(arms) + 1)]
    check_arms([runs[lo:hi] for lo, hi in zip(starts, starts[1:], strict=False)])
    data_dir = source.data_dir
    # the data every run needs, loaded once now so that a missing file stops us before measuring
    load_dataset(runs[0].measured_on, config.split, data_dir, samples=config.samples)
    load_dataset(runs[0].trained_on, "test", data_dir)

    summaries = []
    runs_done = Task(progress, "comparing", len(runs), unit="runs")  # then each run's tasks
    for run in runs:
        with warnings.catch_warnings():  # check_runs said it once already
            warnings.filterwarnings("ignore", message="measuring on ")
            sharpness_task = Task(progress, f"{run.name}: sharpness", None)
            report = checkpoint_sharpness(
                run.checkpoint,
                config,
                replace(source, dataset=run.measured_on),
                use_cache=use_cache,
                progress=scoped(progress, run.name),
            )
            sharpness_task.finish(note=cache_note(report.cached, tuple(report.measures)))
        with warnings.catch_warnings():  # notes on loading were said when it was measured
            warnings.simplefilter("ignore", CheckpointNote)
            point = load_point(
                run.checkpoint, replace(source, dataset=run.trained_on), split="test"
            )
        info = point.info
        if "test_accuracy" not in (info.metrics or {}):
            test_loss, test_acc = evaluate(point.model, point.inputs, point.targets)
            x, y = load_dataset(point.dataset, "train", data_dir).tensors
            train_loss, train_acc = evaluate(point.model, x, y)
            info = replace(
                info,
                metrics={
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                },
            )
        history = accuracy_history(info)
        summaries.append(
            summarise(run.name, info, report, len(point.targets), history, last_epochs=last_epochs)
        )
        runs_done.update(len(summaries))
    runs_done.finish()
    arm_summaries: list[RunSummary] = []
    for lo, hi in zip(starts, starts[1:], strict=False):
        summary = arm(summaries[lo:hi])
        while summary.name in [s.name for s in arm_summaries]:
            summary = replace(summary, name=summary.name + "'")
        arm_summaries.append(summary)
    return compare(arm_summaries, tie_sigmas=tie_sigmas)


def comparison_as_dict(
    comparison: Comparison, record: Provenance | None = None
) -> dict[str, object]:
    """The body of ``flatcli compare --json``: runs, ratios, verdicts, provenance
    (:func:`flatcli.report.text.compare_as_dict` puts it in the envelope of
    :mod:`flatcli.report.schema`; every measure is an ``Estimate.as_dict()``).

    ``record`` is the provenance of the call that measured the runs
    (:func:`~flatcli.workflows.provenance.provenance`); by default this process's, with the
    device ``auto`` resolves to.
    """
    return {**comparison_fields(comparison), "provenance": record or provenance()}


def comparison_fields(comparison: Comparison) -> dict[str, object]:
    """The runs, ratios and verdicts of ``comparison`` as JSON (a part of the demo's document).

    Each entry of ``runs`` is an arm: ``n`` runs (``runs``, their names), its values the
    means over them, ``spread`` each averaged quantity's mean with its standard error
    (``{value, uncertainty, kind, converged, sd, n}``; empty for one run),
    ``judged_accuracy`` the test accuracy the verdicts compare with its noise
    (``{value, uncertainty, kind, converged, source, count}``:
    :class:`~flatcli.analysis.seeds.JudgedAccuracy`).
    Each verdict says which noise its accuracy tie used (``accuracy_noise``).
    """
    runs = []
    for r in comparison.runs:
        runs.append(
            {
                "name": r.name,
                "optimizer": r.optimizer,
                "l2": r.l2,
                "weight_decay": r.weight_decay,
                "averaging": r.averaging,
                "train_loss": r.train_loss,
                "test_loss": r.test_loss,
                "train_accuracy": r.train_accuracy,
                "test_accuracy": r.test_accuracy,
                "generalisation_gap": r.gap,
                "weight_norm": r.weight_norm,
                "test_size": r.test_size,
                "n": r.seeds,
                "runs": list(r.runs) or [r.name],
                "judged_accuracy": r.accuracy.as_dict() if r.accuracy is not None else None,
                "spread": {k: v.as_dict() for k, v in r.spread.items()},
                **{k: m.as_dict() for k, m in r.measures.items()},
            }
        )
    return {
        "runs": runs,
        "ratios": [
            {"name": r.name, **ratios}
            for r, ratios in zip(comparison.runs, comparison.ratios, strict=True)
        ],
        "verdicts": [asdict(v) for v in comparison.verdicts],
    }


def run_densities(
    paths: Sequence[str | os.PathLike[str]],
    config: SharpnessConfig,
    source: CheckpointSource = DEFAULT_SOURCE,
    *,
    use_cache: bool = True,
    progress: ProgressCallback | None = None,
) -> dict[str, Density]:
    """The spectral density of each run (SLQ: the ``density`` measure with ``config``'s
    matrix, data and SLQ settings), keyed by the name :func:`check_runs` gives it (the one
    :func:`compare_checkpoints` uses); cached in each run's ``sharpness.json`` like every
    measure. The runs are checked as :func:`compare_checkpoints` checks them; its
    warnings (a run measured on another data set) are its to give, not repeated here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runs = check_runs(paths, source)
    wanted = replace(config, measures=("density",), per_layer=False)
    densities = {}
    for run in runs:
        with warnings.catch_warnings():  # said when the run was checked or compared
            warnings.filterwarnings("ignore", message="measuring on ")
            warnings.simplefilter("ignore", CheckpointNote)
            report = checkpoint_sharpness(
                run.checkpoint,
                wanted,
                replace(source, dataset=run.measured_on),
                use_cache=use_cache,
                progress=scoped(progress, f"density of {run.name}"),
            )
        density = report.measures["density"]
        if not isinstance(density, Density):  # the registry's density is always one
            raise TypeError(f"the density of {run.name} is a {type(density).__name__}")
        densities[run.name] = density
    return densities
