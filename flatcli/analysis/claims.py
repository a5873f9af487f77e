"""The paper's claims, judged on measured numbers: held, did not hold, or inconclusive.

Granziol (2020, "Flatness is a False Friend", arXiv 2006.09091) claims that L2
regularisation (claim 2) and Gadam (claim 3) give *sharper* solutions that generalise
better, that larger weights with the same predictions look flatter (claim 1's
mechanism), and that the Hessian rank is bounded by about neurons x classes (claim 4).
Each function here turns measurements (a :class:`~flatcli.analysis.verdicts.Comparison`,
a scaling sweep, a :class:`~flatcli.analysis.rank.RankReport`) into a :class:`Claim`
whose evidence quotes the numbers; a tie, or a measure that did not converge, is
inconclusive (``held=None``), never a success. Nothing is canned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flatcli.analysis.rank import MeasuredRank, RankReport
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import Comparison, Verdict

__all__ = [
    "CONTRAST_CLAIMS",
    "SHORT_CLAIMS",
    "Claim",
    "judge",
    "pair_claim",
    "rank_claim",
    "sweep_claim",
]

#: The claim each contrast of two runs tests (contrast title -> claim).
CONTRAST_CLAIMS: dict[str, str] = {
    "L2 regularisation": "L2-regularised solutions are sharper yet generalise better",
    "Gadam vs SGD": "Gadam (AdamW + averaging) is sharper than SGD yet generalises better",
}

SWEEP_CLAIM = "Larger weights with the same predictions look flatter (the mechanism)"
RANK_CLAIM = "Hessian rank is bounded by about neurons x classes"

#: Each claim in a few words, for a table row (the JSON keeps the whole claim).
SHORT_CLAIMS: dict[str, str] = {
    CONTRAST_CLAIMS["L2 regularisation"]: "L2: sharper, generalises better",
    CONTRAST_CLAIMS["Gadam vs SGD"]: "Gadam: sharper than SGD, better",
    SWEEP_CLAIM: "larger weights look flatter",
    RANK_CLAIM: "rank <= neurons x classes",
}


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims, and whether it held here (None: tie or inconclusive)."""

    claim: str
    model: str
    held: bool | None
    evidence: str


#: How each accuracy noise is named in a claim's evidence, given its count.
_NOISE_SHORT = {
    "seeds": "{n} seeds",
    "epochs": "last {n} epochs",
    "binomial": "binomial",
    "threshold": "fixed",
}


def _noise_words(v: Verdict, seeds: int) -> str:
    """``noise 0.6 pts, 3 seeds``: the pair's accuracy tie threshold and what it rests on
    (and, for arms of ``seeds`` > 1 runs whose noise is another, how many seeds).
    """
    sources = v.accuracy_noise.split("+")
    counts = v.accuracy_noise_counts or (0,) * len(sources)
    if len(sources) == 1 and len(set(counts)) > 1 and sources[0] == "seeds":
        how = f"{'/'.join(str(n) for n in counts)} seeds"
    else:
        how = "/".join(_NOISE_SHORT[s].format(n=n) for s, n in zip(sources, counts, strict=False))
    if seeds > 1 and "seeds" not in how:
        how += f"; {seeds} seeds"
    return f"noise {v.accuracy_threshold_points:.1f} pts, {how}"


def pair_claim(model: str, comparison: Comparison, claim: str) -> Claim:
    """Claim 'B is sharper (lambda_max) than A yet generalises better' on one pair.

    Read from the pair's lambda_max verdict: held when B is sharper beyond the tie and
    generalises better beyond the tie; inconclusive when the accuracies tie or lambda_max
    did not converge; not held otherwise. The runs may be arms of several seeds (their
    means); the accuracies are those the verdict judged, and the evidence (one short line)
    says which noise their tie rests on (:func:`flatcli.analysis.verdicts.accuracy_tie`).
    """
    v = next(v for v in comparison.verdicts if v.measure == "lambda_max")
    a, b = comparison.runs
    sharper = "tie" if v.sharpness_tie else ("B" if v.sharpness_ratio > 1 else "A")
    better = "tie" if v.accuracy_tie else ("B" if v.accuracy_difference_points > 0 else "A")
    evidence = (
        f"lambda_max {a.measures['lambda_max'].value:.3g} -> {b.measures['lambda_max'].value:.3g} "
        f"({v.sharpness_ratio:.3g}x), test acc {a.judged_accuracy:.1%} -> "
        f"{b.judged_accuracy:.1%} ({_noise_words(v, max(a.seeds, b.seeds))})"
    )
    if not v.converged:  # no bound to call a difference by
        return Claim(
            claim, model, None, f"lambda_max did not converge (raise --max-iter); {evidence}"
        )
    if sharper == "B" and better == "B":
        return Claim(claim, model, True, f"held: {b.name} sharper, generalises better; {evidence}")
    if sharper == "B":
        what = "test accuracy ties" if better == "tie" else "generalises worse"
        return Claim(
            claim,
            model,
            None if better == "tie" else False,
            f"{b.name} sharper, {what}; {evidence}",
        )
    what = "ties on lambda_max" if sharper == "tie" else "flatter"
    return Claim(claim, model, False, f"did not hold: {b.name} {what}; {evidence}")


def sweep_claim(model: str, sweep: Sequence[SweepRow]) -> Claim:
    """Claim 1's mechanism on a weight-scaling sweep: held when the accuracy is the same
    at every scale and lambda_max falls strictly at each scale >= 1 (two or more of them).
    """
    rows = sorted(sweep, key=lambda r: r.scale)
    up = [r for r in rows if r.scale >= 1.0]
    steps = list(zip(up, up[1:], strict=False))
    same_acc = max(r.accuracy for r in rows) - min(r.accuracy for r in rows) < 1e-12
    flatter = all(b.measures["lambda_max"].value < a.measures["lambda_max"].value for a, b in steps)
    lower_loss = all(b.loss < a.loss for a, b in steps)
    first, last = rows[0], rows[-1]
    accuracy = (
        f"accuracy {first.accuracy:.2%} at every a"
        if same_acc
        else f"accuracy {first.accuracy:.2%} -> {last.accuracy:.2%}"
    )
    desc = (
        f"lambda_max {first.measures['lambda_max'].value:.3g} (a={first.scale:g}) -> "
        f"{last.measures['lambda_max'].value:.3g} (a={last.scale:g}), {accuracy}"
    )
    held = same_acc and flatter and len(up) > 1
    words = (
        "held: same predictions, flatter as the weights grow"
        + ("" if lower_loss else " (loss not monotone: some points misclassified)")
        if held
        else "did not hold on this sweep"
    )
    return Claim(SWEEP_CLAIM, model, held, f"{words}; {desc}")


def rank_claim(model: str, report: RankReport) -> Claim:
    """Claim 4: the effective rank (|lambda| > 1e-2 lambda_max) within the smallest bound.

    An exact rank is compared as it is; an SLQ estimate holds when its value minus two
    standard errors is within the bound (the value itself with one probe).
    """
    m, b = report.measured, report.bound
    if isinstance(m, MeasuredRank):
        eff = m.effective_rank.get(1e-2, next(iter(m.effective_rank.values())))
        held = eff <= b.min_bound
        evidence = (
            f"effective rank (>1e-2 lambda_max) {eff:,}, numerical rank {m.numerical_rank:,}, bound "
            f"{b.min_bound:,} of P={b.num_params:,}"
        )
    else:
        held = (
            m.value - 2 * m.stderr <= b.min_bound
            if math.isfinite(m.stderr)
            else m.value <= b.min_bound
        )
        evidence = (
            f"estimated effective rank {m.value:,.0f} ± {m.stderr:,.0f}, bound {b.min_bound:,} of "
            f"P={b.num_params:,}"
        )
    return Claim(RANK_CLAIM, model, held, ("held: " if held else "did not hold: ") + evidence)


def judge(
    comparisons: Mapping[tuple[str, str], Comparison],
    ranks: Mapping[str, RankReport],
    sweep_model: str,
    sweep: Sequence[SweepRow],
) -> list[Claim]:
    """Every claim: one per (model, contrast) comparison (keyed by a title of
    :data:`CONTRAST_CLAIMS`), the sweep's, then one per model's rank.
    """
    claims = [
        pair_claim(model, comparison, CONTRAST_CLAIMS[title])
        for (model, title), comparison in comparisons.items()
    ]
    claims.append(sweep_claim(sweep_model, sweep))
    claims.extend(rank_claim(model, report) for model, report in ranks.items())
    return claims
