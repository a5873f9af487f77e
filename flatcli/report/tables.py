"""Rendering typed results for people: rich tables and terminal histograms.

Every function takes one of the library's result types and returns what a console
prints; nothing here measures, reads or writes files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flatcli.analysis.claims import SHORT_CLAIMS, Claim
from flatcli.analysis.rank import MeasuredRank, RankReport
from flatcli.analysis.seeds import describe_noise
from flatcli.analysis.sharpness_report import Density, Measurement, SharpnessReport
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import MEASURE_ORDER, Comparison, RunSummary, Verdict
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


def _compared(run: RunSummary, name: str, ratio: float) -> str:
    """A comparison cell: value, uncertainty (or "not converged") and the ratio to the first
    run; for an arm of several seeds the mean and the standard deviation across them.
    """
    measure = run.measures[name]
    unc = f" ± {measure.uncertainty:.2g}" if measure.uncertainty else ""
    sd = _sd(run, name)
    if sd is not None:
        unc = f" ± {sd:.2g}"
    if not measure.converged:
        unc = " not converged"
    return f"{measure.value:.4g}{unc} ({ratio:.2f}x)"


def _sd(run: RunSummary, key: str) -> float | None:
    """The standard deviation of ``key`` across an arm's seeds (None for one run)."""
    spread = run.spread.get(key) if run.seeds > 1 else None
    return spread.sd if spread is not None else None


def _number(run: RunSummary, key: str) -> str:
    """A loss or norm, with `` ± sd`` across seeds for an arm."""
    sd = _sd(run, key)
    value: float = getattr(run, key)
    return f"{value:.4g}" + (f" ± {sd:.2g}" if sd is not None else "")


def _percent(run: RunSummary, key: str) -> str:
    """An accuracy in percent, with `` ± sd`` (points) across seeds for an arm."""
    sd = _sd(run, key)
    value: float = getattr(run, key)
    return f"{value:.2%}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


#: How a judged accuracy's noise is named in a table cell.
_NOISE_SHORT = {"seeds": "{n} seeds", "epochs": "{n} epochs", "binomial": "binomial"}


def _judged(run: RunSummary) -> str:
    """The test accuracy the verdicts judge, ± its noise in points, and where that came from."""
    acc = run.accuracy
    if acc is None:
        return "-"
    how = _NOISE_SHORT[acc.source].format(n=acc.count)
    return f"{acc.value:.1%} ± {100 * acc.noise:.1f} ({how})"


def comparison_table(comparison: Comparison) -> Table:
    """Runs (or arms of several seeds) as columns; each cell shows the value, its uncertainty
    and the ratio to the first run. An arm's column shows the mean over its seeds ± their
    standard deviation; the "judged" row is the test accuracy the verdicts compare, ± its
    noise (:mod:`flatcli.analysis.seeds`).
    """
    runs, ratios = comparison.runs, comparison.ratios
    pairs = list(zip(runs, ratios, strict=True))
    nan = float("nan")
    table = Table(title="runs compared (ratio to the first run in brackets)", title_justify="left")
    table.add_column("", overflow="fold")  # fold, never cut, a word too long for its column
    for r in runs:
        header = f"{r.name}\n({r.seeds} seeds: mean ± sd)" if r.seeds > 1 else r.name
        table.add_column(header, justify="right", overflow="fold")
    table.add_row("optimiser", *[r.optimizer for r in runs])
    table.add_row("l2 (coupled)", *[f"{r.l2:g}" for r in runs])
    table.add_row("weight decay (decoupled)", *[f"{r.weight_decay:g}" for r in runs])
    table.add_row("averaging from epoch", *[str(r.averaging) if r.averaging else "-" for r in runs])
    table.add_row("train loss", *[_number(r, "train_loss") for r in runs])
    table.add_row(
        "test loss",
        *[f"{_number(r, 'test_loss')} ({q.get('test_loss', nan):.2f}x)" for r, q in pairs],
    )
    table.add_row("test accuracy", *[_percent(r, "test_accuracy") for r in runs])
    if any(r.accuracy is not None for r in runs):
        table.add_row("test accuracy judged (± noise)", *[_judged(r) for r in runs])
    table.add_row("generalisation gap (points)", *[f"{r.gap:.2f}" for r in runs])
    table.add_row(
        "||w||",
        *[f"{_number(r, 'weight_norm')} ({q.get('weight_norm', nan):.2f}x)" for r, q in pairs],
    )
    names = [m for m in MEASURE_ORDER if any(m in r.measures for r in runs)]
    names += sorted({m for r in runs for m in r.measures} - set(names))
    for m in names:
        cells = [_compared(r, m, q.get(m, nan)) if m in r.measures else "-" for r, q in pairs]
        table.add_row(MEASURE_ORDER.get(m, m), *cells)
    return table


#: What a verdict's mark says about the flatness hypothesis (``Verdict.agrees``); None is
#: a tie of the test accuracies (a sharpness tie or no convergence has a cell of its own).
_AGREEMENT_MARKS = {True: "✓", False: "✗", None: "~"}

#: The legend printed under a verdict matrix.
VERDICT_LEGEND = (
    "b vs a: b is Nx sharper or flatter than a; Δ acc. = b's test accuracy - a's. ✓ flatness "
    "agrees (the sharper run generalises worse), ✗ disagrees, ~ accuracies tie; n.c. not converged."
)


def verdict_legend(comparison: Comparison) -> str:
    """:data:`VERDICT_LEGEND` and a line saying which accuracy noise the ties rest on.

    Each arm's noise is the one its verdicts used (``Verdict.accuracy_noise``: the
    standard error across seeds, the spread of the last epochs, the binomial standard
    error, or a fixed threshold), arms of one kind named together.
    """
    return f"{VERDICT_LEGEND}\n{accuracy_noise_line(comparison)}"


def accuracy_noise_line(comparison: Comparison) -> str:
    """``accuracy ties: |Δ acc.| within the noise, s.e. over 3 seeds (sgd, sgd-l2)`` (see
    :func:`verdict_legend`; the noise is :func:`flatcli.analysis.verdicts.accuracy_tie`'s).
    """
    verdicts = comparison.verdicts
    if not verdicts:
        return "accuracy noise: no verdicts"
    if all(v.accuracy_noise == "threshold" for v in verdicts):
        points = verdicts[0].accuracy_threshold_points
        return f"accuracy ties: |Δ acc.| <= {points:g} points (a fixed threshold)"
    noise: dict[str, str] = {}
    raised = False  # an arm's own spread was below its test set's binomial noise
    own = {r.name: r.accuracy.source for r in comparison.runs if r.accuracy is not None}
    for v in verdicts:
        sources = v.accuracy_noise.split("+")
        if len(sources) == 1:
            sources *= 2
        for name, source, count in zip((v.a, v.b), sources, v.accuracy_noise_counts, strict=False):
            noise.setdefault(name, describe_noise(source, count))
            raised |= own.get(name, source) != source
    kinds: dict[str, list[str]] = {}
    for name, words in noise.items():
        kinds.setdefault(words, []).append(name)
    described = "; ".join(f"{words} ({', '.join(names)})" for words, names in kinds.items())
    floor = "; a spread below the binomial s.e. counts as that" if raised else ""
    return f"accuracy ties: |Δ acc.| within the noise, {described}{floor}"


def _times(ratio: float) -> str:
    """A ratio >= 1 to 3 significant digits, or as many more (up to 6) as keep it off "1"."""
    for digits in range(3, 7):
        text = f"{ratio:.{digits}g}"
        if text != "1":
            break
    return text


def _verdict_cell(verdict: Verdict, comparison: Comparison) -> str:
    """A short matrix cell on two lines: "2.4x ✓" over "sharper", "tie" or "n.c."."""
    if not verdict.converged:
        return "n.c."
    if verdict.sharpness_tie:
        return "tie"
    runs = {r.name: r for r in comparison.runs}
    va = runs[verdict.a].measures[verdict.measure].value
    vb = runs[verdict.b].measures[verdict.measure].value
    hi, lo = max(va, vb), min(va, vb)
    times = f"{_times(hi / lo)}x " if lo > 0 else ""
    return f"{times}{_AGREEMENT_MARKS[verdict.agrees]}\n{'sharper' if vb > va else 'flatter'}"


def verdict_matrix(comparison: Comparison) -> Table:
    """The verdicts as one matrix: a row per pair ("b vs a"), a column per measure judged.

    Each cell says how much sharper or flatter ``b`` is than ``a`` and whether that agrees
    with the flatness hypothesis (the sharper run generalises worse; Granziol 2020, "Flatness
    is a False Friend", arXiv 2006.09091, argues it need not), or "tie" / "n.c."
    (not converged); :data:`VERDICT_LEGEND` explains the marks. The full sentences are
    ``Verdict.text``. Labels and cells are broken into short lines beforehand, so that all
    seven measures fit 100 columns without a word folded.
    """
    judged = {v.measure for v in comparison.verdicts}
    names = [m for m in MEASURE_ORDER if m in judged] + sorted(judged - set(MEASURE_ORDER))
    table = Table(
        title="verdicts",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        leading=1,
    )
    table.add_column("pair", overflow="fold")
    table.add_column("Δ acc.\n(points)", justify="right", overflow="fold")
    for m in names:
        label = MEASURE_ORDER.get(m, m).replace(" ", "\n")
        table.add_column(label, justify="right", overflow="fold")
    pairs: dict[tuple[str, str], dict[str, Verdict]] = {}
    for v in comparison.verdicts:
        pairs.setdefault((v.a, v.b), {})[v.measure] = v
    for (a, b), verdicts in pairs.items():
        first = next(iter(verdicts.values()))
        diff = f"{first.accuracy_difference_points:+.2f}" + ("\ntie" if first.accuracy_tie else "")
        cells = [_verdict_cell(verdicts[m], comparison) if m in verdicts else "-" for m in names]
        table.add_row(Text(f"{b} vs\n{a}"), diff, *cells)
    return table


#: How a claim's outcome is shown: held, did not hold, or a tie / inconclusive (None).
_CLAIM_MARKS = {
    True: "[green]held[/]",
    False: "[red]did not hold[/]",
    None: "[yellow]inconclusive[/]",
}


def _evidence(claim: Claim) -> str:
    """The claim's evidence without the "held: " or "did not hold: " the outcome column shows."""
    for prefix in ("held: ", "did not hold: "):
        if claim.evidence.startswith(prefix):
            return claim.evidence[len(prefix) :]
    return claim.evidence


def claims_table(claims: Sequence[Claim]) -> Table:
    """The paper's claims, one row each: outcome, model, claim and the evidence."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("outcome", overflow="fold")
    table.add_column("model", overflow="fold")
    table.add_column("claim", overflow="fold", max_width=26)
    table.add_column("evidence", overflow="fold", ratio=1)
    for c in claims:
        label = SHORT_CLAIMS.get(c.claim, c.claim)
        table.add_row(_CLAIM_MARKS[c.held], Text(c.model), Text(label), Text(_evidence(c)))
    return table


def demo_report(console: Console, result: DemoResult, *, verbose: bool = False) -> None:
    """Print the demo: the claims that held or did not first, then (``verbose``) the details.

    The details are each contrast's runs table and verdict matrix, the rank tables and
    statements, and the weight-scaling sweep; without ``verbose`` one line says where they are.
    """
    console.print(
        f"[bold]The paper's claims on {result.config.dataset}[/] "
        f"({len(result.runs)} runs under {escape(str(result.config.out))}; "
        f"{result.seconds:.0f} s in all)",
        highlight=False,
    )
    console.print(claims_table(result.claims))
    if not verbose:
        console.print(
            "Details (runs, verdict matrices, rank tables, sweep): add --verbose, or --json for all.",
            highlight=False,
        )
        return
    for (model, title), comparison in result.comparisons.items():
        table = comparison_table(comparison)
        table.title = f"{model}: {title}"
        console.print(table)
        console.print(verdict_matrix(comparison))
    if result.comparisons:
        console.print(VERDICT_LEGEND, highlight=False)
    for model, report in result.ranks.items():
        for table in rank_table(report):
            table.title = f"{model}: {table.title}"
            console.print(table)
        statement = rank_statement(report.bound, report.measured, report.is_linear)
        console.print(statement, highlight=False)
    console.print(sweep_table(result.sweep))
