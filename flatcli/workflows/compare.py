"""``flatcli compare`` from checkpoints: check the runs, measure them, judge the pairs.

The verdicts themselves are pure functions of the numbers
(:mod:`flatcli.analysis.verdicts`); this module reads the checkpoints and their data,
measures each run (reusing its cached sharpness), and turns the result into the JSON
document of ``flatcli compare --json``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flatcli.analysis.sharpness_report import SharpnessReport
from flatcli.analysis.verdicts import Comparison, RunSummary, compare
from flatcli.config import TIE_SIGMAS, SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.errors import CheckpointError, DataError, UsageError
from flatcli.models.factory import resolve_factory
from flatcli.workflows.checkpoint import (
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
from flatcli.workflows.training import evaluate

__all__ = [
    "CheckedRun",
    "check_runs",
    "compare_checkpoints",
    "comparison_as_dict",
    "comparison_fields",
    "summarise",
]


def _judgeable(estimate: Estimate) -> Estimate:
    """The estimate as a verdict reads it: a NaN or infinite uncertainty (e.g. a standard
    error of one sample) is an infinite one that did not converge.
    """
    if math.isfinite(estimate.uncertainty):
        return estimate
    return replace(estimate, uncertainty=math.inf, converged=False)


def summarise(
    name: str, info: CheckpointInfo, report: SharpnessReport, test_size: int | None
) -> RunSummary:
    """A :class:`RunSummary` from a checkpoint's metadata and its sharpness report.

    Every measure with an uncertainty and a finite value is kept (a spectral density has
    neither and is left out).
    """
    train_opts, metrics = info.train or {}, info.metrics or {}
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
        averaging=train_opts.get("average_from"),
        train_loss=float(metrics.get("train_loss", report.loss)),
        train_accuracy=float(metrics.get("train_accuracy", report.accuracy)),
        test_loss=float(metrics["test_loss"]),
        test_accuracy=float(metrics["test_accuracy"]),
        weight_norm=report.weight_norm,
        measures=measures,
        test_size=test_size,
    )


@dataclass(frozen=True)
class CheckedRun:
    """A checkpoint that exists and loads, and the data sets it was trained and is measured on."""

    name: str
    checkpoint: Path
    trained_on: str
    measured_on: str


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
        checked.append(CheckedRun(name, ckpt, trained, dataset or trained))
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


def compare_checkpoints(
    paths: Sequence[str | os.PathLike[str]],
    config: SharpnessConfig,
    source: CheckpointSource = DEFAULT_SOURCE,
    *,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
    tie_sigmas: float = TIE_SIGMAS,
) -> Comparison:
    """Measure (or reuse cached) sharpness of each checkpoint and compare them.

    Every run is loaded as ``source`` says. Everything is checked before anything is
    measured: the options, every checkpoint and the data sets (:func:`check_runs`;
    ``source.dataset`` measures all runs on another data set than they were trained on),
    and that the data load.
    """
    if len(paths) < 2:
        raise UsageError(f"a comparison needs at least two runs, got {len(paths)}")
    if not (tie_sigmas >= 0 and math.isfinite(tie_sigmas)):
        raise UsageError(f"tie-sigmas must be a finite number >= 0, got {tie_sigmas}")
    runs = check_runs(paths, source)
    data_dir = source.data_dir
    # the data every run needs, loaded once now so that a missing file stops us before measuring
    load_dataset(runs[0].measured_on, config.split, data_dir, samples=config.samples)
    load_dataset(runs[0].trained_on, "test", data_dir)

    summaries = []
    for run in runs:
        with warnings.catch_warnings():  # check_runs said it once already
            warnings.filterwarnings("ignore", message="measuring on ")
            report = checkpoint_sharpness(
                run.checkpoint,
                config,
                replace(source, dataset=run.measured_on),
                use_cache=use_cache,
                progress=progress,
            )
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
        summaries.append(summarise(run.name, info, report, len(point.targets)))
    return compare(summaries, tie_sigmas=tie_sigmas)


def comparison_as_dict(
    comparison: Comparison, record: Provenance | None = None
) -> dict[str, object]:
    """The JSON document of ``flatcli compare --json``: runs, ratios, verdicts, provenance.

    ``record`` is the provenance of the call that measured the runs
    (:func:`~flatcli.workflows.provenance.provenance`); by default this process's, with the
    device ``auto`` resolves to.
    """
    return {**comparison_fields(comparison), "provenance": record or provenance()}


def comparison_fields(comparison: Comparison) -> dict[str, object]:
    """The runs, ratios and verdicts of ``comparison`` as JSON (a part of the demo's document)."""
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
                **{
                    k: {"value": m.value, "uncertainty": m.uncertainty, "converged": m.converged}
                    for k, m in r.measures.items()
                },
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
