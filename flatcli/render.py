"""Rendering typed results for people: rich tables and terminal histograms."""

from __future__ import annotations

from rich.table import Table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(title: str, metrics: dict) -> Table:
    """A two-column table of a run's final metrics."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key.replace("_", " "), _fmt(value))
    return table


_MEASURE_LABELS = {
    "lambda_max": "lambda_max", "lambda_min": "lambda_min", "spectral_norm": "spectral norm",
    "trace": "trace", "frobenius": "Frobenius norm",
}


def _uncertainty(estimate) -> str:
    if estimate.kind == "exact":
        return "exact"
    sign = "<=" if estimate.kind == "bound" else "±"
    return f"{sign} {estimate.uncertainty:.2g}" + (" (bound)" if estimate.kind == "bound" else " (s.e.)")


def sharpness_table(report) -> Table:
    """The measures of a :class:`~flatcli.measures.SharpnessReport`, one row each."""
    title = (f"{report.curvature} of the mean cross-entropy on {report.dataset or 'data'} ({report.split}, "
             f"N={report.num_samples}, P={report.num_params}, BatchNorm {report.bn_mode}, {report.dtype}, "
             f"{report.device}{', + l2 I = %g' % report.l2 if report.l2 else ''})")
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("uncertainty", justify="right")
    table.add_column("HVPs", justify="right")
    table.add_row("loss", f"{report.loss:.4g}", "", "")
    table.add_row("accuracy", f"{report.accuracy:.2%}", "", "")
    table.add_row("||w||", f"{report.weight_norm:.4g}", "", "")
    for name, est in report.measures.items():
        if not hasattr(est, "uncertainty"):
            continue
        table.add_row(_MEASURE_LABELS.get(name, name.replace("_", " ")), f"{est.value:.5g}", _uncertainty(est),
                      str(est.hvps) if est.hvps else "")
    table.caption = f"{report.hvps} Hessian-vector products in {report.seconds:.2f} s"
    return table


def layers_table(report) -> Table:
    names = [m for m in report.layers[0].measures] if report.layers else []
    table = Table(title="per layer (diagonal blocks of the matrix)", title_justify="left")
    table.add_column("layer")
    table.add_column("params", justify="right")
    for m in names:
        table.add_column(_MEASURE_LABELS.get(m, m), justify="right")
    for layer in report.layers:
        table.add_row(layer.name, str(layer.num_params),
                      *[f"{layer.measures[m].value:.4g}" for m in names])
    return table


def density_histogram(grid, values, bins: int = 24, width: int = 40) -> str:
    """A terminal histogram of a spectral density, bar lengths on a log scale.

    The density is integrated over ``bins`` equal eigenvalue intervals; each bar's length
    is proportional to log10 of the interval's mass, from 1e-6 (empty) to 1 (full).
    """
    import numpy as np

    g, v = np.asarray(grid, dtype=float), np.asarray(values, dtype=float)
    edges = np.linspace(g[0], g[-1], bins + 1)
    lines = ["eigenvalue interval            mass (log scale)"]
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (g >= lo) & (g <= hi)
        mass = float(np.trapezoid(v[mask], g[mask])) if mask.sum() > 1 else 0.0
        n = 0 if mass <= 1e-6 else int(round(width * (6 + np.log10(min(mass, 1.0))) / 6))
        lines.append(f"[{lo:11.4g}, {hi:11.4g})  {'#' * n:<{width}} {mass:.1e}")
    return "\n".join(lines)
