"""Measured results as CSV files, for a spreadsheet or a plotting tool of one's own."""

from __future__ import annotations

from pathlib import Path

from flatcli.analysis.sharpness_report import Density


def density_csv(density: Density) -> str:
    """A spectral density as CSV: a header, then one ``eigenvalue,density`` row per grid point.

    Numbers are written with ``repr``, so that reading them back gives the same floats.
    """
    rows = zip(density.grid, density.values, strict=True)
    return "eigenvalue,density\n" + "".join(f"{g!r},{v!r}\n" for g, v in rows)


def write_density_csv(density: Density, path: Path) -> None:
    """Write :func:`density_csv` to ``path`` (an OSError if it cannot be written)."""
    path.write_text(density_csv(density))
