"""Statements in plain words about measured numbers, and the JSON documents that carry them.

:func:`rank_statement` says what a measured Hessian rank means for the rank bound of
Granziol (2020, "Flatness is a False Friend", arXiv 2006.09091, claim 4): exact for
linear models (so a rank above it is reported loudly), an approximation for nonlinear
ones. The statement is part of ``flatcli rank-bound --json`` and of ``flatcli demo
--json``, so the documents are put together here, every command's in one place
(:func:`train_as_dict`, :func:`sharpness_as_dict`, :func:`sweep_as_dict`,
:func:`rank_as_dict`, :func:`compare_as_dict`, :func:`demo_as_dict`), each the body the
layers below build, in the envelope of :func:`flatcli.report.schema.document`: the layers
below the report compute numbers, not sentences, and know no envelope.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from flatcli.analysis.rank import MeasuredRank, RankBound, RankEstimate, RankReport
from flatcli.analysis.sharpness_report import SharpnessReport
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import Comparison
from flatcli.report.schema import document
from flatcli.workflows.compare import comparison_as_dict, comparison_fields
from flatcli.workflows.demo import DemoResult
from flatcli.workflows.provenance import Provenance, provenance
from flatcli.workflows.training import TrainResult

__all__ = [
    "compare_as_dict",
    "demo_as_dict",
    "rank_as_dict",
    "rank_fields",
    "rank_statement",
    "sharpness_as_dict",
    "sweep_as_dict",
    "train_as_dict",
]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _effective_words(ranks: Mapping[float, int], bound: int) -> str:
    parts = []
    for f, r in ranks.items():
        rel = "within" if r <= bound else "above"
        parts.append(f"{r} above {f:g} lambda_max ({rel} the bound)")
    return "; ".join(parts)


def rank_statement(bound: RankBound, measured: MeasuredRank | RankEstimate, is_linear: bool) -> str:
    """What the measured rank says about the bound, in plain words and with the numbers.

    Linear models: the bound is exact for the Gauss-Newton matrix (and for the Hessian
    of a one-layer model, where the two coincide), so a measured GGN rank above it is a
    contradiction and is reported loudly. For a multi-layer linear model the Hessian also
    has the bilinear residual term, which may raise its rank above the bound away from a
    stationary point; that is said, not hidden. Nonlinear models: the bound holds for the
    effective rank under the Kronecker-factored approximation; the exact rank may exceed it.
    """
    p, b = bound.num_params, bound.paper_bound
    head = (
        f"Rank bound (C-1) * sum(fan_in+1) = {bound.num_classes - 1} x "
        f"{sum(i.fan_in + 1 for i in bound.layers)} = {b:,} ({_pct(bound.paper_fraction)} of "
        f"P = {p:,}); data bound N(C-1) = {bound.data_bound:,}; smallest bound {bound.min_bound:,} "
        f"({_pct(bound.bound_fraction)} of P)."
    )
    one_layer = len(bound.layers) == 1
    lines = [head]
    if isinstance(measured, RankEstimate):
        low, high = measured.value - 2 * measured.stderr, measured.value + 2 * measured.stderr
        err = (
            f"+- {measured.stderr:,.1f}"
            if math.isfinite(measured.stderr)
            else "(no error bar: one probe)"
        )
        lines.append(
            f"Estimated effective rank (SLQ, {measured.probes} probes, |lambda| > {measured.fraction:g} "
            f"lambda_max): {measured.value:,.1f} {err}; an estimate, not an exact rank."
        )
        over = math.isfinite(low) and low > bound.min_bound
        if is_linear and over:
            lines.append(
                f"WARNING: for a linear model the estimate exceeds the bound {bound.min_bound:,} by more "
                f"than 2 standard errors ({low:,.1f} .. {high:,.1f}): either the quadrature is too "
                "coarse (raise --iterations) or something is wrong."
            )
        elif is_linear:
            lines.append("Linear model: the bound is exact; the estimate is consistent with it.")
        else:
            where = (
                "above" if over else ("within" if high <= bound.min_bound else "consistent with")
            )
            lines.append(
                f"Nonlinear model: the bound holds for the effective rank only under the "
                f"Kronecker-factored approximation; the estimate is {where} it."
            )
        return " ".join(lines)

    m = measured
    found = (
        f"Exact (dense float64, |lambda| > {m.threshold:.2g} max|lambda|): Hessian rank "
        f"{m.numerical_rank:,} ({_pct(m.numerical_rank / p)} of P), GGN rank {m.ggn_rank:,}; "
        f"effective Hessian rank: {_effective_words(m.effective_rank, b)}."
    )
    lines.append(found)
    if is_linear:
        if m.ggn_rank > bound.min_bound:
            lines.append(
                f"WARNING: this is a linear model, for which the bound is exact, yet the GGN rank "
                f"{m.ggn_rank:,} EXCEEDS the bound {bound.min_bound:,}. That contradicts the theory: "
                "check the threshold or report a bug."
            )
        elif m.numerical_rank > bound.min_bound and one_layer:
            lines.append(
                f"WARNING: for this one-layer linear model the Hessian equals the GGN, yet its rank "
                f"{m.numerical_rank:,} EXCEEDS the bound {bound.min_bound:,}: numerical noise above "
                "the threshold, or a bug."
            )
        elif m.numerical_rank > bound.min_bound:
            lines.append(
                f"Linear model: the GGN rank {m.ggn_rank:,} obeys the exact bound, but the Hessian rank "
                f"{m.numerical_rank:,} exceeds it by {m.numerical_rank - bound.min_bound:,}: the residual "
                "term sum_c (p_c - y_c) d2z_c/dw2 couples the layers and only vanishes at a stationary "
                "point, so the paper's bound does not hold for this Hessian here."
            )
        else:
            lines.append(
                f"Linear model: the bound is exact and the measured ranks obey it "
                f"({m.numerical_rank:,} <= {bound.min_bound:,})."
            )
    else:
        verdict = (
            f"exceeds it by {m.numerical_rank - b:,}" if m.numerical_rank > b else "is within it"
        )
        lines.append(
            f"Nonlinear model: the bound holds for the effective rank under the Kronecker-factored "
            f"approximation, not for the exact rank; the exact Hessian rank {verdict}."
        )
    return " ".join(lines)


def rank_as_dict(report: RankReport, record: Provenance | None = None) -> dict[str, object]:
    """The JSON document of ``flatcli rank-bound --json``: the numbers, the statement, provenance.

    ``record`` is the provenance of the call that measured the ranks
    (:func:`~flatcli.workflows.provenance.provenance`); by default this process's, with the
    device ``auto`` resolves to.
    """
    return document("rank-bound", rank_fields(report), record or provenance())


def rank_fields(report: RankReport) -> dict[str, object]:
    """The numbers of ``report`` and their statement as JSON (a part of the demo's document)."""
    return {
        **report.as_dict(),
        "statement": rank_statement(report.bound, report.measured, report.is_linear),
    }


def demo_as_dict(result: DemoResult) -> dict[str, object]:
    """The JSON document of ``flatcli demo --json``: runs, comparisons, ranks, sweep, claims."""
    body = {
        "dataset": result.config.dataset,
        "models": list(result.config.models),
        "seeds": result.config.seeds,
        "runs": {k: str(v) for k, v in result.runs.items()},
        "comparisons": [
            {"model": m, "contrast": t, **comparison_fields(c)}
            for (m, t), c in result.comparisons.items()
        ],
        "rank": {m: rank_fields(r) for m, r in result.ranks.items()},
        "sweep": {"model": result.sweep_model, "rows": [r.as_dict() for r in result.sweep]},
        "claims": [c.__dict__ for c in result.claims],
        "seconds": result.seconds,
    }
    return document("demo", body, result.provenance or provenance())


def train_as_dict(result: TrainResult, record: Provenance | None = None) -> dict[str, object]:
    """The JSON document of ``flatcli train --json``: the final metrics (``train_loss``,
    ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``weight_norm``, ``epochs``,
    ``seconds``), the checkpoint and run directory, and ``record``, the provenance of the
    training call (default this process's).
    """
    body = {
        **result.metrics,
        "checkpoint": str(result.checkpoint),
        "run_dir": str(result.run_dir),
    }
    return document("train", body, record or provenance())


def sharpness_as_dict(report: SharpnessReport) -> dict[str, object]:
    """The JSON document of ``flatcli sharpness --json``: :meth:`SharpnessReport.as_dict`
    in the envelope, with the report's provenance (this process's on its device when the
    report has none).
    """
    return document("sharpness", report.as_dict(), report.provenance or provenance(report.device))


def sweep_as_dict(
    rows: Sequence[SweepRow], layers: str, split: str, record: Provenance | None = None
) -> dict[str, object]:
    """The JSON document of ``flatcli sharpness --scale --json``: the ``split`` measured,
    the layers scaled (``scale_layer``), one row per factor (:meth:`SweepRow.as_dict`).
    """
    body = {"split": split, "scale_layer": layers, "rows": [row.as_dict() for row in rows]}
    return document("sharpness", body, record or provenance())


def compare_as_dict(comparison: Comparison, record: Provenance | None = None) -> dict[str, object]:
    """The JSON document of ``flatcli compare --json``: the body of
    :func:`~flatcli.workflows.compare.comparison_as_dict` (runs, ratios, verdicts) in the
    envelope, with ``record`` as its provenance (default this process's).
    """
    return document("compare", comparison_as_dict(comparison, record))
