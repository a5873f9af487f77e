"""Rendering typed results for people: rich tables and terminal histograms.

Every function takes one of the library's result types and returns what a console
prints; nothing here measures, reads or writes files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from flatcli.analysis.rank import MeasuredRank, RankReport
from flatcli.analysis.sharpness_report import Density, Measurement, SharpnessReport
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import MEASURE_ORDER, Comparison
from flatcli.curvature.results import Estimate
from flatcli.report.text import rank_statement
from flatcli.workflows.demo import DemoResult


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(title: str, metrics: Mapping[str, object]) -> Table:
    """A two-column table of a run's final metrics."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key.replace("_", " "), _fmt(value))
    return table


_MEASURE_LABELS = {
    "lambda_max": "lambda_max",
    "lambda_min": "lambda_min",
    "spectral_norm": "spectral norm",
    "trace": "trace",
    "frobenius": "Frobenius norm",
}

#: How each kind of uncertainty is written after the value: its sign and its name.
_UNCERTAINTY_WORDS = {"bound": ("<=", "bound"), "stderr": ("±", "s.e.")}


def _uncertainty(estimate: Estimate) -> str:
    if not estimate.converged:  # the number is no bound and no standard error
        what = "residual" if estimate.kind == "bound" else "s.e."
        return f"not converged ({what} {estimate.uncertainty:.2g})"
    if estimate.kind == "exact":
        return "exact"
    sign, name = _UNCERTAINTY_WORDS[estimate.kind]
    return f"{sign} {estimate.uncertainty:.2g} ({name})"


def _hvps(estimate: Estimate, report: SharpnessReport) -> str:
    """The HVPs column: the products spent, or the measure whose products were shared
    (the first of ``shared_with``, which carries their cost).
    """
    if estimate.hvps:
        return str(estimate.hvps)
    partners = [m for m in estimate.shared_with if m in report.measures]
    return f"(with {partners[0]})" if partners and estimate.kind != "exact" else ""


def sharpness_table(report: SharpnessReport) -> Table:
    """The measures of a :class:`~flatcli.analysis.sharpness_report.SharpnessReport`, one row each."""
    l2 = f", + l2 I = {report.l2:g}" if report.l2 else ""
    title = (
        f"{report.curvature} of the mean cross-entropy on {report.dataset or 'data'} ({report.split}, "
        f"N={report.num_samples}, P={report.num_params}, BatchNorm {report.bn_mode}, {report.dtype}, "
        f"{report.device}{l2})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("uncertainty", justify="right")
    table.add_column("HVPs", justify="right")
    table.add_row("loss", f"{report.loss:.4g}", "", "")
    table.add_row("accuracy", f"{report.accuracy:.2%}", "", "")
    table.add_row("||w||", f"{report.weight_norm:.4g}", "", "")
    for name, est in _estimates(report.measures).items():  # the density has its own histogram
        table.add_row(
            _MEASURE_LABELS.get(name, name.replace("_", " ")),
            f"{est.value:.5g}",
            _uncertainty(est),
            _hvps(est, report),
        )
    table.caption = f"{report.hvps} Hessian-vector products in {report.seconds:.2f} s"
    return table


def layers_table(report: SharpnessReport) -> Table:
    """The per-layer measures (diagonal blocks of the matrix), one row per layer."""
    names = list(_estimates(report.layers[0].measures)) if report.layers else []
    table = Table(title="per layer (diagonal blocks of the matrix)", title_justify="left")
    table.add_column("layer")
    table.add_column("params", justify="right")
    for m in names:
        table.add_column(_MEASURE_LABELS.get(m, m), justify="right")
    for layer in report.layers:
        estimates = _estimates(layer.measures)
        table.add_row(layer.name, str(layer.num_params), *[_value(estimates[m]) for m in names])
    return table


def _estimates(measures: Mapping[str, Measurement]) -> dict[str, Estimate]:
    """The measures that are one number each (all but a spectral density)."""
    return {name: m for name, m in measures.items() if isinstance(m, Estimate)}


def _value(estimate: Estimate) -> str:
    """A value for a table without an uncertainty column, marked when not converged."""
    return f"{estimate.value:.4g}" + ("" if estimate.converged else " (not converged)")


def density_histogram(density: Density, bins: int = 24, width: int = 40) -> str:
    """A terminal histogram of a spectral density, bar lengths on a log scale.

    The density is integrated over ``bins`` equal eigenvalue intervals; each bar's length
    is proportional to log10 of the interval's mass, from 1e-6 (empty) to 1 (full).
    """
    g = np.asarray(density.grid, dtype=float)
    v = np.asarray(density.values, dtype=float)
    edges = np.linspace(g[0], g[-1], bins + 1)
    lines = ["eigenvalue interval            mass (log scale)"]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (g >= lo) & (g <= hi)
        mass = float(np.trapezoid(v[mask], g[mask])) if mask.sum() > 1 else 0.0
        n = 0 if mass <= 1e-6 else int(round(width * (6 + np.log10(min(mass, 1.0))) / 6))
        lines.append(f"[{lo:11.4g}, {hi:11.4g})  {'#' * n:<{width}} {mass:.1e}")
    return "\n".join(lines)


def sweep_table(rows: Sequence[SweepRow], layers: str = "all") -> Table:
    """One row per scale factor of the weight-scaling sweep."""
    table = Table(
        title=f"weights of {'all layers' if layers == 'all' else 'the ' + layers + ' layer'} "
        "multiplied by a",
        title_justify="left",
    )
    for col in ("a", "||w||", "loss", "accuracy"):
        table.add_column(col, justify="right")
    names = list(rows[0].measures) if rows else []
    for name in names:
        table.add_column(_MEASURE_LABELS.get(name, name), justify="right")
    for row in rows:
        table.add_row(
            f"{row.scale:g}",
            f"{row.weight_norm:.4g}",
            f"{row.loss:.4g}",
            f"{row.accuracy:.2%}",
            *[_value(row.measures[n]) for n in names],
        )
    return table


def rank_table(report: RankReport) -> list[Table]:
    """The layers with their fan-in, then the bounds and the measured ranks."""
    b, m = report.bound, report.measured
    layers = Table(title="layers counted by the bound", title_justify="left")
    for col in ("layer", "kind", "fan-in", "neurons", "(C-1)(fan-in+1)"):
        layers.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for info in b.layers:
        layers.add_row(
            info.name,
            info.kind,
            str(info.fan_in),
            str(info.neurons),
            f"{(b.num_classes - 1) * (info.fan_in + 1):,}",
        )
    ranks = Table(title="rank", title_justify="left")
    ranks.add_column("quantity")
    ranks.add_column("value", justify="right")
    ranks.add_column("fraction of P", justify="right")
    p = b.num_params
    rows = [
        ("parameters P", p),
        ("paper bound (C-1) sum(fan-in+1)", b.paper_bound),
        ("data bound N(C-1)", b.data_bound),
    ]
    if isinstance(m, MeasuredRank):
        rows += [
            (f"Hessian numerical rank (|lambda| > {m.threshold:.2g} max)", m.numerical_rank),
            ("GGN numerical rank", m.ggn_rank),
        ]
        rows += [
            (f"effective rank (|lambda| > {k:g} lambda_max)", v)
            for k, v in m.effective_rank.items()
        ]
    for label, value in rows:
        ranks.add_row(label, f"{value:,}", f"{value / p:.2%}")
    if not isinstance(m, MeasuredRank):
        ranks.add_row(
            f"effective rank, SLQ estimate (|lambda| > {m.fraction:g} lambda_max)",
            f"{m.value:,.0f} ± {m.stderr:,.0f}",
            f"{m.value / p:.2%}",
        )
    return [layers, ranks]


def _compared(measure: Estimate, ratio: float) -> str:
    """A comparison cell: value, uncertainty (or "not converged") and the ratio to the first run."""
    unc = f" ± {measure.uncertainty:.2g}" if measure.uncertainty else ""
    if not measure.converged:
        unc = " not converged"
    return f"{measure.value:.4g}{unc} ({ratio:.2f}x)"


def comparison_table(comparison: Comparison) -> Table:
    """Runs as columns; each cell shows the value, its uncertainty and the ratio to the first run."""
    runs, ratios = comparison.runs, comparison.ratios
    pairs = list(zip(runs, ratios, strict=True))
    nan = float("nan")
    table = Table(title="runs compared (ratio to the first run in brackets)", title_justify="left")
    table.add_column("")
    for r in runs:
        table.add_column(r.name, justify="right")
    table.add_row("optimiser", *[r.optimizer for r in runs])
    table.add_row("l2 (coupled)", *[f"{r.l2:g}" for r in runs])
    table.add_row("weight decay (decoupled)", *[f"{r.weight_decay:g}" for r in runs])
    table.add_row("averaging from epoch", *[str(r.averaging) if r.averaging else "-" for r in runs])
    table.add_row("train loss", *[f"{r.train_loss:.4g}" for r in runs])
    table.add_row(
        "test loss",
        *[f"{r.test_loss:.4g} ({q.get('test_loss', nan):.2f}x)" for r, q in pairs],
    )
    table.add_row("test accuracy", *[f"{r.test_accuracy:.2%}" for r in runs])
    table.add_row("generalisation gap (points)", *[f"{r.gap:.2f}" for r in runs])
    table.add_row(
        "||w||",
        *[f"{r.weight_norm:.4g} ({q.get('weight_norm', nan):.2f}x)" for r, q in pairs],
    )
    names = [m for m in MEASURE_ORDER if any(m in r.measures for r in runs)]
    names += sorted({m for r in runs for m in r.measures} - set(names))
    for m in names:
        cells = [
            _compared(r.measures[m], q.get(m, nan)) if m in r.measures else "-" for r, q in pairs
        ]
        table.add_row(MEASURE_ORDER.get(m, m), *cells)
    return table


#: How a claim's outcome is shown: held, did not hold, or a tie / inconclusive (None).
_CLAIM_MARKS = {
    True: "[green]held[/]",
    False: "[red]did not hold[/]",
    None: "[yellow]tie / inconclusive[/]",
}


def demo_report(console: Console, result: DemoResult) -> None:
    """Print the demo: comparisons, rank, sweep, then the claims that held or did not."""
    for (model, title), comparison in result.comparisons.items():
        table = comparison_table(comparison)
        table.title = f"{model}: {title}"
        console.print(table)
        for v in comparison.verdicts:
            console.print(f"  - {v.text}", highlight=False)
    for model, report in result.ranks.items():
        for table in rank_table(report):
            table.title = f"{model}: {table.title}"
            console.print(table)
        statement = rank_statement(report.bound, report.measured, report.is_linear)
        console.print(statement, highlight=False)
    console.print(sweep_table(result.sweep))
    console.print(
        f"\n[bold]The paper's claims on {result.config.dataset}[/] (computed from the numbers above)"
    )
    for c in result.claims:
        console.print(f"- {c.claim} \\[{c.model}]: {_CLAIM_MARKS[c.held]}", highlight=False)
        console.print(f"    {c.evidence}", highlight=False, markup=False)
    console.print(
        f"{len(result.runs)} runs under {result.config.out}; {result.seconds:.0f} s in all."
    )
