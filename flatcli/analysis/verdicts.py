"""Verdicts on pairs of runs: ratios of their measures and the flatness hypothesis in plain words.

The question of "Flatness is a False Friend" (Granziol 2020, arXiv 2006.09091) for any
two runs A and B: is the sharper one (by lambda_max, Tr H, ||H||_F, or a scale-aware
measure) also the one that generalises worse, as the flatness hypothesis predicts?
Everything here is computed from the numbers given; nothing is measured.

Two kinds of ties keep the verdicts honest:

* Sharpness: values a and b with uncertainties u_a and u_b (a Lanczos residual bound or
  a standard error; 0 for an exact value) are tied when
  ``|a - b| <= tie_sigmas * sqrt(u_a^2 + u_b^2)``.
* Accuracy: the judged test accuracies p_a and p_b, each with its noise sigma_a,
  sigma_b (:mod:`flatcli.analysis.seeds`: the standard error across seeds, else the
  spread of the last epochs, else the binomial standard error), are tied when
  ``|p_a - p_b| <= accuracy_sigmas * sqrt(sigma_a^2 + sigma_b^2)``. A noise is never
  taken below the binomial standard error ``sqrt(p (1 - p) / n)`` of its run's n test
  samples: one test set cannot measure an accuracy more finely than that. When both
  sides are binomial (runs known only by their final accuracy) the pooled
  two-proportion standard error ``SE = sqrt(pbar (1 - pbar) (1/n_a + 1/n_b))``,
  ``pbar = (n_a p_a + n_b p_b) / (n_a + n_b)`` replaces the root sum of squares (the
  z-test for equal proportions). When both runs use the same test set the difference is
  paired and these errors are conservative (they call more ties). A fixed threshold in
  points (``tie_accuracy``) replaces all this when given. Each :class:`Verdict` records
  which noise it used (``accuracy_noise``).

A tie on either side gives ``agrees = None`` and a text that says "tie". Otherwise the
flatness hypothesis *agrees* when the sharper run has the lower test accuracy.

A measure that did not converge (a Lanczos run stopped before its tolerance, a standard
error from too few samples: ``Estimate.converged`` False) carries no usable uncertainty, so
neither a tie nor a difference can be called: its verdict says "not converged" with
``agrees = None``.

Accuracies are fractions in [0, 1], as flatcli reports them; differences are printed
in percentage points (1 point = 0.01).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flatcli.analysis.seeds import JudgedAccuracy, Spread, binomial_se, describe_noise
from flatcli.config import ACCURACY_SIGMAS, TIE_SIGMAS
from flatcli.curvature.results import Estimate
from flatcli.errors import UsageError


def check_measure(estimate: Estimate) -> None:
    """Refuse (:class:`UsageError`) a value a verdict cannot be given on, or given wrongly.

    The value must be finite; the uncertainty must be >= 0, and finite unless the
    estimate did not converge (then it may be infinite: no verdict is given on it).
    """
    if not math.isfinite(estimate.value):
        raise UsageError(f"a measure value must be finite, got {estimate.value}")
    unc = estimate.uncertainty
    if not (unc >= 0 and (math.isfinite(unc) or not estimate.converged)):
        raise UsageError(f"an uncertainty must be finite and >= 0, got {unc}")


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
        measures: name -> :class:`~flatcli.curvature.results.Estimate` (e.g.
            ``lambda_max``, ``trace``, ``frobenius``, ``lambda_max_normalised``), each
            oriented so that larger means sharper; checked by :func:`check_measure`.
        test_size: number of test samples behind ``test_accuracy`` (for the binomial
            standard error of the accuracy), or None.
        accuracy: the test accuracy the verdicts judge, with its noise and where it came
            from (:func:`flatcli.analysis.seeds.run_accuracy`); None: the final
            ``test_accuracy`` with its binomial standard error.
        runs: the runs an arm of several seeds averages (:func:`flatcli.analysis.seeds.arm`);
            empty for one run.
        spread: for an arm, each averaged quantity's mean, sd and se over its runs.
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
    measures: Mapping[str, Estimate] = field(default_factory=dict)
    test_size: int | None = None
    accuracy: JudgedAccuracy | None = None
    runs: tuple[str, ...] = ()
    spread: Mapping[str, Spread] = field(default_factory=dict)

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
        for estimate in self.measures.values():
            check_measure(estimate)

    @property
    def gap(self) -> float:
        """Generalisation gap in percentage points: 100 * (train_accuracy - test_accuracy)."""
        return 100.0 * (self.train_accuracy - self.test_accuracy)

    @property
    def judged_accuracy(self) -> float:
        """The test accuracy the verdicts compare: ``accuracy.value``, else ``test_accuracy``."""
        return self.accuracy.value if self.accuracy is not None else self.test_accuracy

    @property
    def seeds(self) -> int:
        """How many runs this summary averages (1 for a single run)."""
        return max(1, len(self.runs))


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
        accuracy_threshold_points: the accuracy difference (points) within which the
            accuracies tie.
        accuracy_noise: the noise that threshold rests on (:class:`AccuracyTie`):
            ``"seeds"``, ``"epochs"``, ``"binomial"`` or ``"threshold"`` (a fixed one);
            ``"epochs+binomial"`` (a's first) when the two sides differ.
        accuracy_noise_counts: the seeds, epochs or test samples behind each side's
            noise (a's, b's; empty for a fixed threshold).
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
    accuracy_threshold_points: float = 0.0
    accuracy_noise: str = "threshold"
    accuracy_noise_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class AccuracyTie:
    """The accuracy difference within which two runs tie, and the noise it rests on.

    Attributes:
        points: the threshold in percentage points.
        noise: ``"seeds"``, ``"epochs"``, ``"binomial"``, ``"threshold"`` (a fixed
            threshold), or both sides' sources joined by ``+`` when they differ.
        counts: the seeds, epochs or test samples behind each side's noise.
        words: the noise in words (``s.e. over 3 seeds``).
    """

    points: float
    noise: str = "threshold"
    counts: tuple[int, ...] = ()
    words: str = "a fixed threshold"


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


def _noise(run: RunSummary) -> tuple[float, str, int]:
    """One side's accuracy noise (a fraction), its source and count, floored at the
    binomial standard error of the run's test set (module docstring).
    """
    acc = run.accuracy
    if acc is None:
        if run.test_size is None:
            raise UsageError(
                f"run {run.name!r} has no test_size, so an accuracy tie cannot be judged",
                hint="give each run's test_size or a tie_accuracy threshold in points",
            )
        return binomial_se(run.test_accuracy, run.test_size), "binomial", run.test_size
    if acc.source != "binomial" and run.test_size is not None:
        floor = binomial_se(acc.value, run.test_size)
        if floor > acc.noise:
            return floor, "binomial", run.test_size
    return acc.noise, acc.source, acc.count


def accuracy_tie(
    a: RunSummary,
    b: RunSummary,
    *,
    tie_accuracy: float | None = None,
    accuracy_sigmas: float = ACCURACY_SIGMAS,
) -> AccuracyTie:
    """The accuracy difference (in points) below which ``a`` and ``b`` are tied, and why.

    ``tie_accuracy`` if given, else ``accuracy_sigmas`` times the noise of the difference
    (module docstring): the pooled two-proportion standard error when both sides are
    binomial, else ``sqrt(sigma_a^2 + sigma_b^2)``.
    """
    if tie_accuracy is not None:
        if not tie_accuracy >= 0:
            raise UsageError(f"tie_accuracy must be >= 0 points, got {tie_accuracy}")
        return AccuracyTie(float(tie_accuracy))
    (sa, source_a, n_a), (sb, source_b, n_b) = _noise(a), _noise(b)
    if source_a == source_b == "binomial":
        p_a, p_b = a.judged_accuracy, b.judged_accuracy
        pooled = (n_a * p_a + n_b * p_b) / (n_a + n_b)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    else:
        se = math.sqrt(sa**2 + sb**2)
    noise = source_a if source_a == source_b else f"{source_a}+{source_b}"
    if (source_a, n_a) == (source_b, n_b):
        words = describe_noise(source_a, n_a)
    else:
        words = f"{describe_noise(source_a, n_a)} ({a.name}), {describe_noise(source_b, n_b)} ({b.name})"
    return AccuracyTie(100.0 * accuracy_sigmas * se, noise, (n_a, n_b), words)


def accuracy_threshold_points(
    a: RunSummary,
    b: RunSummary,
    *,
    tie_accuracy: float | None = None,
    accuracy_sigmas: float = ACCURACY_SIGMAS,
) -> float:
    """The accuracy difference (in points) below which ``a`` and ``b`` are tied
    (:func:`accuracy_tie`'s ``points``).
    """
    return accuracy_tie(a, b, tie_accuracy=tie_accuracy, accuracy_sigmas=accuracy_sigmas).points


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def verdict(
    a: RunSummary,
    b: RunSummary,
    measure: str,
    *,
    tie_sigmas: float = TIE_SIGMAS,
    accuracy_points: float | AccuracyTie,
) -> Verdict:
    """The verdict of ``a`` against ``b`` on ``measure`` (both must have it), given the
    accuracy tie threshold ``accuracy_points`` (a number of points, or an
    :class:`AccuracyTie` that also says which noise it rests on).
    """
    tie = (
        accuracy_points
        if isinstance(accuracy_points, AccuracyTie)
        else AccuracyTie(accuracy_points)
    )
    accuracy_points = tie.points
    ma, mb = a.measures[measure], b.measures[measure]
    label = MEASURE_ORDER.get(measure, measure)
    diff_points = 100.0 * (b.judged_accuracy - a.judged_accuracy)
    combined = math.sqrt(ma.uncertainty**2 + mb.uncertainty**2)
    sharp_tie = abs(mb.value - ma.value) <= tie_sigmas * combined
    acc_tie = abs(diff_points) <= accuracy_points
    values = f"{_fmt(ma.value)} vs {_fmt(mb.value)}"
    accs = f"test accuracy {100 * a.judged_accuracy:.2f}% vs {100 * b.judged_accuracy:.2f}%"
    judged = functools.partial(
        Verdict,
        a=a.name,
        b=b.name,
        measure=measure,
        sharpness_ratio=_ratio(mb.value, ma.value),
        accuracy_difference_points=diff_points,
        accuracy_tie=acc_tie,
        accuracy_threshold_points=accuracy_points,
        accuracy_noise=tie.noise,
        accuracy_noise_counts=tie.counts,
    )

    if not (ma.converged and mb.converged):  # no uncertainty to judge a tie or a difference by
        which = " and ".join(r.name for r, m in ((a, ma), (b, mb)) if not m.converged)
        return judged(
            sharpness_tie=False,
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
        acc_words = (
            f"their test accuracies tie ({accs}; |difference| {abs(diff_points):.2f} <= "
            f"{accuracy_points:.2f} points, noise: {tie.words})"
        )
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
    return judged(
        sharpness_tie=sharp_tie, agrees=agrees, text=f"{sharp_words}; {acc_words}: {tail}."
    )


def compare(
    runs: Sequence[RunSummary],
    tie_sigmas: float = TIE_SIGMAS,
    tie_accuracy: float | None = None,
    *,
    accuracy_sigmas: float = ACCURACY_SIGMAS,
) -> Comparison:
    """Ratios to the first run and verdicts for every pair of ``runs``.

    Args:
        runs: two or more runs with distinct names.
        tie_sigmas: sharpness differences within ``tie_sigmas`` combined uncertainties
            are ties.
        tie_accuracy: accuracy differences up to this many points are ties; default:
            ``accuracy_sigmas`` times the noise of the difference (:func:`accuracy_tie`;
            a run without ``accuracy`` needs ``test_size``).
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
            points = accuracy_tie(a, b, tie_accuracy=tie_accuracy, accuracy_sigmas=accuracy_sigmas)
            for m in _ordered_measures(a, b):
                verdicts.append(verdict(a, b, m, tie_sigmas=tie_sigmas, accuracy_points=points))
    return Comparison(runs=runs, ratios=tuple(ratios), verdicts=tuple(verdicts))


__all__ = [
    "MEASURE_ORDER",
    "AccuracyTie",
    "Comparison",
    "RunSummary",
    "Verdict",
    "accuracy_threshold_points",
    "accuracy_tie",
    "check_measure",
    "compare",
    "verdict",
]
