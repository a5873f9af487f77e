"""Side-by-side comparison of runs: ratios of their measures and verdicts in plain words.

The question of "Flatness is a False Friend" (Granziol 2020, arXiv 2006.09091) for any
two runs A and B: is the sharper one (by lambda_max, Tr H, ||H||_F, or a scale-aware
measure) also the one that generalises worse, as the flatness hypothesis predicts?
Everything here is computed from the numbers given; nothing is measured.

Two kinds of ties keep the verdicts honest:

* Sharpness: values a and b with uncertainties u_a and u_b (a Lanczos residual bound or
  a standard error; 0 for an exact value) are tied when
  ``|a - b| <= tie_sigmas * sqrt(u_a^2 + u_b^2)``.
* Accuracy: test accuracies p_a and p_b measured on n_a and n_b test samples are tied
  when ``|p_a - p_b| <= accuracy_sigmas * SE`` with the pooled two-proportion standard
  error ``SE = sqrt(pbar (1 - pbar) (1/n_a + 1/n_b))``, ``pbar = (n_a p_a + n_b p_b) /
  (n_a + n_b)`` (the z-test for equal proportions). When both runs use the same test
  set the difference is paired and this SE is conservative (it calls more ties). A
  fixed threshold in points (``tie_accuracy``) replaces it when given.

A tie on either side gives ``agrees = None`` and a text that says "tie". Otherwise the
flatness hypothesis *agrees* when the sharper run has the lower test accuracy.

A measure that did not converge (a Lanczos run stopped before its tolerance, a standard
error from too few samples: ``Measure.converged`` False) carries no usable uncertainty, so
neither a tie nor a difference can be called: its verdict says "not converged" with
``agrees = None``.

Accuracies are fractions in [0, 1], as flatcli reports them; differences are printed
in percentage points (1 point = 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from flatcli.errors import UsageError


@dataclass(frozen=True)
class Measure:
    """A sharpness value and its uncertainty (Lanczos bound or standard error; 0 if exact).

    Every measure is oriented so that larger means sharper. ``converged=False``: the
    estimator stopped before its uncertainty means what it says (see
    :class:`flatcli.analysis.measures.Estimate`); the uncertainty may then be infinite, and no
    verdict is given on the measure.
    """

    value: float
    uncertainty: float = 0.0
    converged: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise UsageError(f"a measure value must be finite, got {self.value}")
        if not (self.uncertainty >= 0 and (math.isfinite(self.uncertainty) or not self.converged)):
            raise UsageError(f"an uncertainty must be finite and >= 0, got {self.uncertainty}")


@dataclass(frozen=True)
class RunSummary:
    """What is known about one trained run.

    Attributes:
        name: how the run is called in the verdicts.
        optimizer, l2, weight_decay: how it was trained (coupled L2 coefficient and
            decoupled weight decay).
        averaging: epoch at which iterate averaging started, or None.
        train_loss, test_loss: mean cross-entropy.
        train_accuracy, test_accuracy: fractions in [0, 1].
        weight_norm: ||w||_2 over all parameters.
        measures: name -> :class:`Measure` (e.g. ``lambda_max``, ``trace``,
            ``frobenius``, ``lambda_max_normalised``); larger = sharper.
        test_size: number of test samples behind ``test_accuracy`` (for the binomial
            standard error of the accuracy), or None.
    """

    name: str
    optimizer: str
    l2: float
    weight_decay: float
    averaging: int | None
    train_loss: float
    test_loss: float
    test_accuracy: float
    train_accuracy: float
    weight_norm: float
    measures: Mapping[str, Measure] = field(default_factory=dict)
    test_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("train_accuracy", "test_accuracy"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise UsageError(
                    f"run {self.name!r}: {key} must be a fraction in [0, 1], got {value}",
                    hint="accuracies are fractions, not percentages",
                )
        if self.test_size is not None and (isinstance(self.test_size, bool) or self.test_size < 1):
            raise UsageError(
                f"run {self.name!r}: test_size must be a positive integer, got {self.test_size!r}"
            )

    @property
    def gap(self) -> float:
        """Generalisation gap in percentage points: 100 * (train_accuracy - test_accuracy)."""
        return 100.0 * (self.train_accuracy - self.test_accuracy)


@dataclass(frozen=True)
class Verdict:
    """Run ``a`` against run ``b`` on one measure.

    Attributes:
        a, b: run names (``a`` comes first in the list of runs).
        measure: the measure's name.
        sharpness_ratio: ``value_b / value_a`` (inf when value_a is 0).
        accuracy_difference_points: ``100 * (test_accuracy_b - test_accuracy_a)``.
        sharpness_tie, accuracy_tie: whether each difference is within its tie threshold.
        agrees: True when the sharper run has the lower test accuracy (the flatness
            hypothesis holds for this pair), False when it has the higher one, None on a
            tie or when a measure did not converge.
        text: one sentence with the numbers.
        converged: both runs' values of the measure converged (else no verdict).
    """

    a: str
    b: str
    measure: str
    sharpness_ratio: float
    accuracy_difference_points: float
    sharpness_tie: bool
    accuracy_tie: bool
    agrees: bool | None
    text: str
    converged: bool = True


@dataclass(frozen=True)
class Comparison:
    """Runs, their ratios to the first run, and the verdicts of every pair.

    ``ratios[i][key] = runs[i] / runs[0]`` for each measure both have, and for
    ``weight_norm`` and ``test_loss``. ``verdicts`` holds, for each pair i < j (in
    that order), one verdict per measure the two runs share (see :data:`MEASURE_ORDER`).
    """

    runs: tuple[RunSummary, ...]
    ratios: tuple[dict[str, float], ...]
    verdicts: tuple[Verdict, ...]


#: Known measures, in the order verdicts are given, with the label used in the text.
#: Other measures follow alphabetically under their own names.
MEASURE_ORDER: dict[str, str] = {
    "lambda_max": "lambda_max",
    "trace": "Tr(H)",
    "frobenius": "||H||_F",
    "lambda_max_normalised": "lambda_max ||w||^2",
    "trace_normalised": "Tr(H) ||w||^2",
    "frobenius_normalised": "||H||_F ||w||^2",
    "adaptive_sharpness": "adaptive sharpness",
    "relative_flatness": "relative flatness",
}


def _ratio(x: float, y: float) -> float:
    """X / y, with inf (or nan for 0/0) when y is 0."""
    if y != 0:
        return x / y
    return math.nan if x == 0 else math.copysign(math.inf, x)


def _ordered_measures(a: RunSummary, b: RunSummary) -> list[str]:
    shared = set(a.measures) & set(b.measures)
    known = [m for m in MEASURE_ORDER if m in shared]
    return known + sorted(shared - set(known))


def accuracy_threshold_points(
    a: RunSummary, b: RunSummary, *, tie_accuracy: float | None = None, accuracy_sigmas: float = 1.0
) -> float:
    """The accuracy difference (in points) below which ``a`` and ``b`` are tied.

    ``tie_accuracy`` if given, else ``accuracy_sigmas`` times the pooled two-proportion
    standard error (module docstring), which needs both runs' ``test_size``.
    """
    if tie_accuracy is not None:
        if not tie_accuracy >= 0:
            raise UsageError(f"tie_accuracy must be >= 0 points, got {tie_accuracy}")
        return float(tie_accuracy)
    if a.test_size is None or b.test_size is None:
        missing = a.name if a.test_size is None else b.name
        raise UsageError(
            f"run {missing!r} has no test_size, so an accuracy tie cannot be judged",
            hint="give each run's test_size or a tie_accuracy threshold in points",
        )
    n_a, n_b = a.test_size, b.test_size
    pooled = (n_a * a.test_accuracy + n_b * b.test_accuracy) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return 100.0 * accuracy_sigmas * se


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def verdict(
    a: RunSummary, b: RunSummary, measure: str, *, tie_sigmas: float = 2.0, accuracy_points: float
) -> Verdict:
    """The verdict of ``a`` against ``b`` on ``measure`` (both must have it), given the
    accuracy tie threshold ``accuracy_points``.
    """
    ma, mb = a.measures[measure], b.measures[measure]
    label = MEASURE_ORDER.get(measure, measure)
    diff_points = 100.0 * (b.test_accuracy - a.test_accuracy)
    combined = math.sqrt(ma.uncertainty**2 + mb.uncertainty**2)
    sharp_tie = abs(mb.value - ma.value) <= tie_sigmas * combined
    acc_tie = abs(diff_points) <= accuracy_points
    values = f"{_fmt(ma.value)} vs {_fmt(mb.value)}"
    accs = f"test accuracy {100 * a.test_accuracy:.2f}% vs {100 * b.test_accuracy:.2f}%"

    if not (ma.converged and mb.converged):  # no uncertainty to judge a tie or a difference by
        which = " and ".join(r.name for r, m in ((a, ma), (b, mb)) if not m.converged)
        return Verdict(
            a=a.name,
            b=b.name,
            measure=measure,
            sharpness_ratio=_ratio(mb.value, ma.value),
            accuracy_difference_points=diff_points,
            sharpness_tie=False,
            accuracy_tie=acc_tie,
            agrees=None,
            text=f"{label} of {which} did not converge ({values}): not converged, no verdict on flatness.",
            converged=False,
        )

    if sharp_tie:
        sharp_words = (
            f"{a.name} and {b.name} tie on {label} ({values}, difference within "
            f"{tie_sigmas:g} x combined uncertainty {_fmt(combined)})"
        )
    else:
        sharper, flatter = (b, a) if mb.value > ma.value else (a, b)
        hi, lo = max(ma.value, mb.value), min(ma.value, mb.value)
        ordered = (
            f"{_fmt(sharper.measures[measure].value)} vs {_fmt(flatter.measures[measure].value)}"
        )
        times = f"{hi / lo:.3g}x sharper" if lo > 0 else "sharper"
        sharp_words = f"{sharper.name} is {times} than {flatter.name} by {label} ({ordered})"

    if acc_tie:
        acc_words = f"their test accuracies tie ({accs}; |difference| {abs(diff_points):.2f} <= {accuracy_points:.2f} points)"
    else:
        better = b if diff_points > 0 else a
        acc_words = f"{better.name} generalises {abs(diff_points):.2f} points better ({accs})"

    if sharp_tie or acc_tie:
        agrees = None
        tail = "tie: no verdict on flatness"
    else:
        sharper_is_b = mb.value > ma.value
        b_better = diff_points > 0
        agrees = sharper_is_b != b_better  # the sharper run generalises worse
        tail = (
            "flatness agrees with generalisation here"
            if agrees
            else "flatness disagrees with generalisation here"
        )
    return Verdict(
        a=a.name,
        b=b.name,
        measure=measure,
        sharpness_ratio=_ratio(mb.value, ma.value),
        accuracy_difference_points=diff_points,
        sharpness_tie=sharp_tie,
        accuracy_tie=acc_tie,
        agrees=agrees,
        text=f"{sharp_words}; {acc_words}: {tail}.",
    )


def compare(
    runs: Sequence[RunSummary],
    tie_sigmas: float = 2.0,
    tie_accuracy: float | None = None,
    *,
    accuracy_sigmas: float = 1.0,
) -> Comparison:
    """Ratios to the first run and verdicts for every pair of ``runs``.

    Args:
        runs: two or more runs with distinct names.
        tie_sigmas: sharpness differences within ``tie_sigmas`` combined uncertainties
            are ties.
        tie_accuracy: accuracy differences up to this many points are ties; default:
            ``accuracy_sigmas`` pooled binomial standard errors (needs ``test_size``).
        accuracy_sigmas: see ``tie_accuracy``; 1 by default (a difference must exceed
            one standard error to count).
    """
    runs = tuple(runs)
    if len(runs) < 2:
        raise UsageError(f"a comparison needs at least two runs, got {len(runs)}")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"run names must be distinct, got {names}")
    if not tie_sigmas >= 0 or not accuracy_sigmas >= 0:
        raise UsageError("tie_sigmas and accuracy_sigmas must be >= 0")

    base = runs[0]
    ratios = []
    for run in runs:
        r = {
            m: _ratio(run.measures[m].value, base.measures[m].value)
            for m in _ordered_measures(base, run)
        }
        r["weight_norm"] = _ratio(run.weight_norm, base.weight_norm)
        r["test_loss"] = _ratio(run.test_loss, base.test_loss)
        ratios.append(r)

    verdicts = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            points = accuracy_threshold_points(
                a, b, tie_accuracy=tie_accuracy, accuracy_sigmas=accuracy_sigmas
            )
            for m in _ordered_measures(a, b):
                verdicts.append(verdict(a, b, m, tie_sigmas=tie_sigmas, accuracy_points=points))
    return Comparison(runs=runs, ratios=tuple(ratios), verdicts=tuple(verdicts))


__all__ = [
    "MEASURE_ORDER",
    "Comparison",
    "Measure",
    "RunSummary",
    "Verdict",
    "accuracy_threshold_points",
    "compare",
    "verdict",
]


# ----------------------------------------------------------------------------------------
# From checkpoints to summaries

#: Measures ``flatcli compare`` reports by default: the paper's and the scale-aware ones.
DEFAULT_COMPARE_MEASURES = (
    "lambda_max",
    "trace",
    "frobenius",
    "lambda_max_normalised",
    "trace_normalised",
    "adaptive_sharpness",
    "relative_flatness",
)


def _measure(estimate: Any) -> Measure:
    """A :class:`Measure` from a :class:`flatcli.analysis.measures.Estimate`; a NaN or infinite
    uncertainty (e.g. a standard error of one sample) is an unconverged one.
    """
    unc = float(estimate.uncertainty)
    converged = bool(getattr(estimate, "converged", True)) and math.isfinite(unc)
    return Measure(float(estimate.value), unc if math.isfinite(unc) else math.inf, converged)


def summarise(name: str, info: Any, report: Any, test_size: int | None) -> RunSummary:
    """A :class:`RunSummary` from a checkpoint's metadata and its sharpness report."""
    train_opts, metrics = info.train or {}, info.metrics or {}
    measures = {
        k: _measure(v)
        for k, v in report.measures.items()
        if hasattr(v, "uncertainty") and math.isfinite(v.value)
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
    checkpoint: Any  # Path
    trained_on: str
    measured_on: str


def check_runs(
    paths: Sequence[Any],
    *,
    dataset: str | None = None,
    model_factory: Any = None,
    factory_args: dict | None = None,
    output: str | int | None = None,
) -> list[CheckedRun]:
    """Check every run before anything is measured: each checkpoint exists and loads, all
    were trained on ONE data set (else their accuracies say nothing about each other), and
    the data set measured on (``dataset``, default the training set) fits each model.
    ``model_factory`` (with ``factory_args`` and ``output``, see
    :func:`~flatcli.workflows.checkpoint.load_checkpoint`) builds every run's model; a checkpoint
    without flatcli metadata names no data set, and is taken as trained on ``dataset``.

    Raises :class:`~flatcli.errors.CheckpointError` or :class:`~flatcli.errors.DataError`
    (one line naming the run and both data sets); warns when a run is measured on another
    data set (of the same input shape and classes) than it was trained on.
    """
    import warnings
    from pathlib import Path

    from flatcli.errors import DataError
    from flatcli.models.factory import resolve_factory
    from flatcli.workflows.checkpoint import MODEL_FILE, load_checkpoint, resolve_checkpoint_path
    from flatcli.workflows.data import get_spec

    factory = resolve_factory(model_factory, factory_args)  # imported once for every run
    checked: list[CheckedRun] = []
    for path in paths:
        ckpt = resolve_checkpoint_path(path)
        with warnings.catch_warnings():  # said again when the run is measured
            warnings.simplefilter("ignore")
            _, info = load_checkpoint(ckpt, model_factory=factory, output=output)
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


def _check_metrics(ckpt: Any, metrics: dict) -> None:
    """The recorded metrics that :func:`summarise` reads are numbers (accuracies fractions)."""
    from flatcli.errors import CheckpointError

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
    paths: Sequence[Any],
    config: Any,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
    tie_sigmas: float = 2.0,
    dataset: str | None = None,
    model_factory: Any = None,
    factory_args: dict | None = None,
    output: str | int | None = None,
) -> Comparison:
    """Measure (or reuse cached) sharpness of each checkpoint and compare them.

    Everything is checked before anything is measured: the options, every checkpoint and
    the data sets (:func:`check_runs`; ``dataset`` measures all runs on another data set
    than they were trained on), and that the data load.
    """
    import warnings

    from flatcli.workflows.checkpoint import CheckpointNote
    from flatcli.workflows.data import load_dataset
    from flatcli.workflows.sharpness import load_point, sharpness
    from flatcli.workflows.training import evaluate

    if len(paths) < 2:
        raise UsageError(f"a comparison needs at least two runs, got {len(paths)}")
    if not (tie_sigmas >= 0 and math.isfinite(tie_sigmas)):
        raise UsageError(f"tie-sigmas must be a finite number >= 0, got {tie_sigmas}")
    loading = {"model_factory": model_factory, "factory_args": factory_args, "output": output}
    runs = check_runs(paths, dataset=dataset, **loading)
    # the data every run needs, loaded once now so that a missing file stops us before measuring
    load_dataset(runs[0].measured_on, config.split, data_dir, samples=config.samples)
    load_dataset(runs[0].trained_on, "test", data_dir)

    summaries = []
    for run in runs:
        with warnings.catch_warnings():  # check_runs said it once already
            warnings.filterwarnings("ignore", message="measuring on ")
            report = sharpness(
                run.checkpoint,
                config,
                dataset=run.measured_on,
                data_dir=data_dir,
                device=device,
                use_cache=use_cache,
                progress=progress,
                **loading,
            )
        with warnings.catch_warnings():  # notes on loading were said when it was measured
            warnings.simplefilter("ignore", CheckpointNote)
            point = load_point(
                run.checkpoint,
                split="test",
                dataset=run.trained_on,
                data_dir=data_dir,
                device=device,
                **loading,
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


def comparison_as_dict(comparison: Comparison) -> dict:
    """The JSON document of ``flatcli compare --json``: runs, ratios, verdicts."""
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
            {"name": r.name, **ratios} for r, ratios in zip(comparison.runs, comparison.ratios)
        ],
        "verdicts": [asdict(v) for v in comparison.verdicts],
    }
