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
