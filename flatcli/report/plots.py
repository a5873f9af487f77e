"""Figures of measured results (matplotlib, an optional dependency: ``flatcli[plot]``).

matplotlib is imported by the functions that need it, so that the rest of flatcli (and
its command line) works without it; a missing matplotlib is one line saying how to get it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from flatcli.analysis.sharpness_report import Density
from flatcli.errors import UsageError

#: The density's floor on the log axis: an empty stretch of the spectrum stays drawable.
DENSITY_FLOOR = 1e-12


def _matplotlib() -> ModuleType:
    """Matplotlib with its file-only backend, or a UsageError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib", hint="pip install 'flatcli[plot]'") from None
    matplotlib.use("Agg")
    return matplotlib


def image_formats() -> list[str]:
    """The file suffixes (without the dot) matplotlib can write, sorted."""
    _matplotlib()
    from matplotlib.figure import Figure

    return sorted(Figure().canvas.get_supported_filetypes())


def check_plot_path(path: Path) -> None:
    """Refuse (UsageError) a figure file whose suffix names no format matplotlib writes."""
    formats = image_formats()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(
            f"--plot {path}: unknown image format {path.suffix or '(none)'}",
            hint=f"use one of: {', '.join('.' + f for f in formats)}",
        )


def plot_density(density: Density, path: Path) -> None:
    """Draw a spectral density on a log scale to ``path`` (the format from its suffix)."""
    _matplotlib()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(density.grid, [max(v, DENSITY_FLOOR) for v in density.values])
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
