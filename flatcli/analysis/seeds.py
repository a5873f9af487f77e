"""Runs of several seeds as one arm, and a test accuracy with its noise.

A verdict such as "the sharper run generalises better" compares two test accuracies; it
means something only when their difference exceeds the noise of training, not only that
of the test set. Granziol (2020, "Flatness is a False Friend", arXiv 2006.09091; see
``docs/paper.md``) averages its comparisons over runs; a single run's final epoch is one
draw of a number that still swings at a constant learning rate. This module turns what is
known about the runs into the accuracy a verdict judges and its noise, in this order of
preference:

* ``"seeds"``: an arm of n >= 2 runs that differ only in their seed. Its accuracy is the
  mean of the runs' accuracies and its noise the standard error of that mean,
  ``s / sqrt(n)`` with ``s`` the sample standard deviation (ddof = 1).
* ``"epochs"``: one run with a recorded history (``metrics.jsonl``) and no iterate
  averaging. Its accuracy is the mean over the last K epochs
  (:data:`~flatcli.config.ACCURACY_EPOCHS`) and its noise the sample standard deviation
  of those K epochs: the spread of where the run could have stopped. (Not divided by
  sqrt(K): successive epochs are strongly correlated, so they are not K independent draws.)
* ``"binomial"``: the final model's test accuracy ``p`` on ``N`` test samples, with the
  binomial standard error ``sqrt(p (1 - p) / N)``. An averaged run's final model is the
  average of the iterates, which the history (of the live iterate) never evaluated, so
  it is judged this way; so is a checkpoint without a history (a file from elsewhere).

The verdicts never take a noise below the test set's binomial standard error
(:func:`flatcli.analysis.verdicts.accuracy_tie`): no spread over seeds or epochs
measured on one test set of N samples can make it more precise than that.

An arm's sharpness (:func:`arm`) is the mean over its runs; its uncertainty combines the
spread across seeds with each run's own uncertainty ``u_i`` (a Lanczos bound or a
standard error) as the standard error of a mean of noisy values,
``sqrt(s^2 / n + mean(u_i^2) / n)``.

Everything here is a pure function of numbers; nothing is read or measured.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from flatcli.config import ACCURACY_EPOCHS
from flatcli.curvature.results import Estimate
from flatcli.errors import UsageError

if TYPE_CHECKING:  # verdicts.py imports this module; an arm is built with dataclasses.replace
    from flatcli.analysis.verdicts import RunSummary

__all__ = [
    "NOISE_SOURCES",
    "NoiseSource",
    "Spread",
    "JudgedAccuracy",
    "arm",
    "arm_name",
    "binomial_se",
    "run_accuracy",
    "spread",
]

#: Where an accuracy's noise comes from, in order of preference (module docstring).
NoiseSource = Literal["seeds", "epochs", "binomial"]
NOISE_SOURCES: tuple[NoiseSource, ...] = ("seeds", "epochs", "binomial")

#: The quantities of a run, besides its measures, that an arm averages.
ARM_QUANTITIES = ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "weight_norm")


@dataclass(frozen=True)
class Spread:
    """A quantity over the n runs of an arm: mean, sample standard deviation (ddof = 1)
    and standard error of the mean ``sd / sqrt(n)``; with one run there is no spread
    (``sd`` and ``se`` None).
    """

    mean: float
    sd: float | None
    se: float | None
    n: int

    def as_dict(self) -> dict[str, float | int | str | bool | None]:
        """The JSON form, flatcli's one uncertainty object plus the spread:
        ``{value: mean, uncertainty: se, kind: "stderr", converged, sd, n}`` (``converged``
        False and no uncertainty with one run).
        """
        return {
            "value": self.mean,
            "uncertainty": self.se,
            "kind": "stderr",
            "converged": self.se is not None,
            "sd": self.sd,
            "n": self.n,
        }


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (one or more numbers)."""
    if not values:
        raise UsageError("an arm needs at least one run")
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Spread(mean, None, None, 1)
    sd = statistics.stdev(values)
    return Spread(mean, sd, sd / math.sqrt(n), n)


@dataclass(frozen=True)
class JudgedAccuracy:
    """A test accuracy as a verdict judges it, with its noise and where that came from.

    Attributes:
        value: the accuracy, a fraction in [0, 1] (a mean over seeds or epochs, or the
            final model's).
        noise: its standard deviation, a fraction (module docstring).
        source: ``"seeds"``, ``"epochs"`` or ``"binomial"``.
        count: the seeds, epochs or test samples behind ``noise``.
    """

    value: float
    noise: float
    source: NoiseSource
    count: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise UsageError(f"a test accuracy must be a fraction in [0, 1], got {self.value}")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise UsageError(f"an accuracy noise must be finite and >= 0, got {self.noise}")

    def describe(self) -> str:
        """Where the noise came from, in words: ``sd over 3 seeds``."""
        return describe_noise(self.source, self.count)

    def as_dict(self) -> dict[str, float | int | str | bool]:
        """The JSON form, flatcli's one uncertainty object plus where the noise came from:
        ``{value, uncertainty: noise, kind: "stderr", converged: true, source, count}``.
        """
        return {
            "value": self.value,
            "uncertainty": self.noise,
            "kind": "stderr",
            "converged": True,
            "source": self.source,
            "count": self.count,
        }


#: How each noise source is said, given its count.
_NOISE_WORDS: Mapping[str, str] = {
    "seeds": "s.e. over {n} seeds",
    "epochs": "sd of the last {n} epochs",
    "binomial": "binomial s.e. of {n} test samples",
}


def describe_noise(source: str, count: int) -> str:
    """``s.e. over 3 seeds``, ``sd of the last 5 epochs``, ``binomial s.e. of 360 test samples``."""
    return _NOISE_WORDS[source].format(n=count)


def binomial_se(p: float, n: int) -> float:
    """The binomial standard error ``sqrt(p (1 - p) / n)`` of an accuracy p on n samples."""
    return math.sqrt(p * (1.0 - p) / n)


def run_accuracy(
    final: float,
    test_size: int | None,
    history: Sequence[float] = (),
    *,
    averaged: bool = False,
    last: int = ACCURACY_EPOCHS,
) -> JudgedAccuracy | None:
    """One run's test accuracy and its noise (module docstring).

    Args:
        final: the final model's test accuracy (the averaged model's for an averaged run).
        test_size: test samples behind ``final``; None when unknown.
        history: the test accuracy after each epoch, oldest first (``metrics.jsonl``).
        averaged: the final model is an average of iterates, which the history never
            evaluated: the final accuracy is judged, with its binomial noise.
        last: K, the epochs averaged; at least 2 of them are needed for a spread.

    Returns None when nothing but ``final`` is known (no history, no test size): the
    verdicts then need a fixed threshold.
    """
    if not (isinstance(last, int) and last >= 2):
        raise UsageError(f"--last-epochs must be an integer >= 2, got {last}")
    tail = list(history[-last:])
    if not averaged and len(tail) >= 2:
        return JudgedAccuracy(statistics.fmean(tail), statistics.stdev(tail), "epochs", len(tail))
    if test_size is None:
        return None
    return JudgedAccuracy(final, binomial_se(final, test_size), "binomial", test_size)


#: A seed suffix of a run's name (``mlp-sgd-s3``), or the prime that tells apart two runs
#: of one name.
_SEED_SUFFIX = re.compile(r"(-s\d+)?'*$")


def arm_name(names: Sequence[str]) -> str:
    """An arm's name from its runs': their common name once a ``-sN`` seed suffix is
    removed (``mlp-sgd-s0, mlp-sgd-s1`` -> ``mlp-sgd``), else the first name and the
    number of runs (``a, b, c`` -> ``a-x3``); one run keeps its name.
    """
    if len(names) == 1:
        return names[0]
    stems = {_SEED_SUFFIX.sub("", name) for name in names}
    if len(stems) == 1 and (stem := stems.pop()):
        return stem
    return f"{names[0]}-x{len(names)}"


def _arm_estimate(estimates: Sequence[Estimate]) -> Estimate:
    """The mean of n runs' values, with ``sqrt(s^2/n + mean(u_i^2)/n)`` (module docstring)."""
    n = len(estimates)
    values = [e.value for e in estimates]
    s = statistics.stdev(values) if n > 1 else 0.0
    own = statistics.fmean(e.uncertainty**2 for e in estimates)
    converged = all(e.converged for e in estimates)
    return Estimate(
        value=statistics.fmean(values),
        uncertainty=math.sqrt(s**2 / n + own / n) if converged else math.inf,
        kind="stderr",
        hvps=sum(e.hvps for e in estimates),
        converged=converged,
        samples=n,
    )


def arm(runs: Sequence[RunSummary], name: str | None = None) -> RunSummary:
    """The runs of one arm (seeds of one training setting) as one summary.

    Each measure every run has, and the losses, accuracies and weight norm, become their
    mean over the runs; ``spread`` keeps each one's :class:`Spread`; measures are
    :class:`~flatcli.curvature.results.Estimate` s whose uncertainty combines the spread
    with the runs' own (module docstring; not converged when any run's was not). The
    judged accuracy is the mean of the runs' (:attr:`RunSummary.judged_accuracy`) with
    its standard error across seeds. One run is returned as it is (renamed to ``name``).
    The training options are the first run's: that they agree is the caller's check.
    """
    if not runs:
        raise UsageError("an arm needs at least one run")
    first = runs[0]
    name = name or arm_name([r.name for r in runs])
    if len(runs) == 1:
        return replace(first, name=name)
    shared = [m for m in first.measures if all(m in r.measures for r in runs)]
    measures = {m: _arm_estimate([r.measures[m] for r in runs]) for m in shared}
    spreads = {q: spread([getattr(r, q) for r in runs]) for q in ARM_QUANTITIES}
    spreads.update({m: spread([r.measures[m].value for r in runs]) for m in shared})
    judged = spread([r.judged_accuracy for r in runs])
    spreads["judged_accuracy"] = judged
    sizes = {r.test_size for r in runs}
    return replace(
        first,
        name=name,
        measures=measures,
        train_loss=spreads["train_loss"].mean,
        test_loss=spreads["test_loss"].mean,
        train_accuracy=spreads["train_accuracy"].mean,
        test_accuracy=spreads["test_accuracy"].mean,
        weight_norm=spreads["weight_norm"].mean,
        accuracy=JudgedAccuracy(judged.mean, judged.se or 0.0, "seeds", judged.n),
        test_size=sizes.pop() if len(sizes) == 1 else None,
        runs=tuple(r.name for r in runs),
        spread=spreads,
    )
