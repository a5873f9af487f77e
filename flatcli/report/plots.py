"""Figures of measured results (matplotlib, an optional dependency: ``flatcli[plot]``).

The figures follow the paper's (``docs/paper.md``): spectral densities on a log-density
axis, sharpness against the generalisation gap, and the weight-scaling sweep on log-log
axes (larger weights, same predictions, a flatter Hessian); and training curves, on
which a test accuracy that swings at a constant learning rate shows at a glance.

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` (built without
pyplot, so that nothing is kept in a global registry), titled with the runs and the
settings it shows; :func:`save_figure` writes it atomically. matplotlib is imported by
the functions that need it, so that the rest of flatcli (and its command line) works
without it; a missing matplotlib is one line saying how to get it.

A density's log axis: SLQ's Gaussian broadening makes the density fall to ~1e-300
between the eigenvalue clusters; drawn down to there (or to a fixed floor), the figure
is a flat line at the floor with the spectrum squeezed into its top. Values below
:data:`DENSITY_RANGE` of the peak are therefore left out of the line (the axis label
says so), as the paper's figures show about six decades.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from flatcli.analysis.sharpness_report import Density, SharpnessReport
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import MEASURE_ORDER, RunSummary
from flatcli.config import DemoConfig, SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.errors import UsageError
from flatcli.workflows.checkpoint import MODEL_FILE, atomic_write
from flatcli.workflows.demo import VARIANTS, DemoResult
from flatcli.workflows.training import RunHistory

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: A density is drawn down to this fraction of its peak (about six decades, as the paper's).
DENSITY_RANGE = 1e-6
#: The legend gives the test accuracy's range over this many last epochs: a swing at a
#: constant learning rate that one final number hides.
LAST_EPOCHS = 8
#: Resolution of the written figures (dots per inch): small files, legible at 100%.
DPI = 100
#: The measures a sharpness-vs-gap panel may draw, by preference: the first every run has.
GAP_MEASURES = tuple(MEASURE_ORDER)
#: Axis labels of the measures (matplotlib mathtext).
MEASURE_LABELS = {
    "lambda_max": r"$\lambda_{\max}$",
    "lambda_min": r"$\lambda_{\min}$",
    "trace": "trace",
    "frobenius": "Frobenius norm",
    "lambda_max_normalised": r"$\lambda_{\max}\,\|w\|^2$",
    "trace_normalised": r"trace $\|w\|^2$",
    "adaptive_sharpness": "adaptive sharpness",
    "relative_flatness": "relative flatness",
}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_GAP_LABEL = "generalisation gap (train - test accuracy, points)"
#: Panel titles of the demo's sharpness-vs-gap figure.
_GAP_TITLES = {
    "lambda_max": "raw sharpness",
    "lambda_max_normalised": "scale-aware: times the squared weight norm",
}


def _matplotlib() -> ModuleType:
    """Matplotlib with its file-only backend, or a UsageError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib", hint="pip install 'flatcli[plot]'") from None
    matplotlib.use("Agg")
    return matplotlib


def available() -> bool:
    """Whether matplotlib can be imported (figures can be drawn)."""
    try:
        _matplotlib()
    except UsageError:
        return False
    return True


def image_formats() -> list[str]:
    """The file suffixes (without the dot) matplotlib can write, sorted."""
    _matplotlib()
    from matplotlib.figure import Figure

    return sorted(Figure().canvas.get_supported_filetypes())


def check_plot_path(path: Path, option: str = "--plot") -> None:
    """Refuse (UsageError) a figure file that cannot be written: a folder, a file in a folder
    that does not exist, or a suffix that names no format matplotlib writes (also when
    matplotlib is missing). Called before anything is trained or measured.
    """
    formats = image_formats()
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder", hint="give a file name, e.g. plot.png")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise UsageError(
            f"{option} {path}: the folder {path.parent} {what}", hint="create it first"
        )
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(
            f"{option} {path}: unknown image format {path.suffix or '(none)'}",
            hint=f"use one of: {', '.join('.' + f for f in formats)}",
        )


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` (the format from its suffix) atomically; return ``path``.

    The figure goes to a temporary file beside ``path`` that is then renamed over it, so
    an error or a kill never leaves half an image (or costs an existing one).
    """
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
    return path


def _figure(panels: int, width: float = 5.0, height: float = 3.8) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` axes side by side (no pyplot: nothing global to close)."""
    _matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _plain_log(ax: Axes, axis: str = "both") -> None:
    """Log scale on ``axis`` ("x", "y" or "both") with ticks written as plain numbers
    (``0.5``, ``2``, ``300``) rather than powers of ten with a coefficient.
    """
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):  # matplotlib's choice of ticks to label, written with %g
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    for name in ("x", "y") if axis == "both" else (axis,):
        getattr(ax, f"set_{name}scale")("log")
        side = getattr(ax, f"{name}axis")
        side.set_major_formatter(Plain())
        side.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _colour(index: int) -> str:
    """The ``index``-th colour of matplotlib's default cycle (``C0``, ``C1``, ...)."""
    return f"C{index % 10}"


def run_name(checkpoint: str | Path | None) -> str:
    """How a checkpoint is called in a title: its run folder's name, or the file's stem."""
    if checkpoint is None:
        return "model"
    path = Path(checkpoint)
    return path.parent.name if path.name == MODEL_FILE else path.stem


def settings_label(options: Mapping[str, object]) -> str:
    """A run's training settings in a few words: ``sgd lr 0.05, L2 0.005, avg from 30``."""

    def number(key: str, name: str) -> str:
        value = options.get(key)
        return f"{name} {value:g}" if isinstance(value, (int, float)) and value else ""

    optimizer = options.get("recipe") or options.get("optimizer") or ""
    schedule = options.get("schedule")
    words = [
        " ".join(w for w in (str(optimizer), number("lr", "lr")) if w),
        number("l2", "L2"),
        number("weight_decay", "wd"),
        f"avg from {options['average_from']}" if options.get("average_from") else "",
        str(schedule) if schedule and schedule != "constant" else "",
    ]
    return ", ".join(w for w in words if w)


def measurement_label(
    config: SharpnessConfig, samples: int | None = None, slq: bool = False
) -> str:
    """The matrix measured and on what: ``hessian of 1797 train samples, BN batch``; ``slq``
    adds the density's settings (``SLQ 8 probes x 64 steps``).
    """
    count = samples if samples is not None else config.samples
    text = f"{config.curvature} of {count if count is not None else 'all'} {config.split} samples"
    text += f", BN {config.bn_mode}" if config.bn_mode != "eval" else ""
    if slq:
        text += f"; SLQ {config.density_probes} probes x {config.density_iterations} steps"
    return text


def _visible(density: Density) -> tuple[list[float], list[float]]:
    """The density's points, with values below :data:`DENSITY_RANGE` of its peak as NaN
    (a gap in the line, not a floor).
    """
    peak = max((v for v in density.values if math.isfinite(v)), default=0.0)
    cut = peak * DENSITY_RANGE
    values = [v if math.isfinite(v) and v >= cut and v > 0 else math.nan for v in density.values]
    return list(density.grid), values


def _density_panel(ax: Axes, densities: Mapping[str, Density], colours: Mapping[str, str]) -> None:
    """Densities overlaid on a log-density axis, each drawn down to DENSITY_RANGE of its peak."""
    for name, density in densities.items():
        grid, values = _visible(density)
        ax.plot(grid, values, color=colours.get(name), label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel(f"density (log; below {DENSITY_RANGE:g} of peak not drawn)")
    if len(densities) > 1:
        ax.legend(fontsize="small")


def density_figure(density: Density, report: SharpnessReport) -> Figure:
    """The spectral density of one checkpoint, titled with the run and the matrix measured."""
    fig, (ax,) = _figure(1, width=6.0, height=4.0)
    _density_panel(ax, {run_name(report.checkpoint): density}, {})
    ax.set_title(
        f"{run_name(report.checkpoint)}: spectral density of the {report.curvature}\n"
        f"{report.num_samples} {report.split} samples of {report.dataset or 'the data'}, "
        f"BN {report.bn_mode}, {report.dtype}",
        fontsize="medium",
    )
    return fig


#: How a point is drawn: its colour and its marker.
Style = tuple[str, str]


def _errorbar(ax: Axes, x: float, estimate: Estimate, style: Style) -> None:
    """One point with its uncertainty as an error bar (clipped above zero on a log axis); a
    point without a finite uncertainty, or that did not converge, is drawn hollow.
    """
    (colour, marker), value, spread = style, estimate.value, estimate.uncertainty
    if not math.isfinite(spread) or not estimate.converged:
        ax.plot([x], [value], ls="none", marker=marker, color=colour, markerfacecolor="none")
        return
    lower = min(spread, 0.9 * value) if value > 0 else spread
    ax.errorbar(
        [x], [value], yerr=[[lower], [spread]], ls="none", marker=marker, color=colour, capsize=3
    )


def _gap_panel(
    ax: Axes,
    runs: Sequence[RunSummary],
    measure: str,
    style: Callable[[RunSummary], Style],
    names: bool = True,
) -> None:
    """``measure`` (error bars) against the generalisation gap, one point per run."""
    for run in runs:
        estimate = run.measures[measure]
        _errorbar(ax, run.gap, estimate, style(run))
        if names:
            ax.annotate(
                run.name,
                (run.gap, estimate.value),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize="x-small",
            )
    if all(run.measures[measure].value > 0 for run in runs):
        _plain_log(ax, "y")
    ax.set_xlabel(_GAP_LABEL)
    ax.set_ylabel(MEASURE_LABELS.get(measure, measure))


def gap_measures(runs: Sequence[RunSummary], wanted: Sequence[str] = GAP_MEASURES) -> list[str]:
    """The measures of ``wanted`` that every run has with a finite value, in that order."""
    return [
        m
        for m in wanted
        if runs and all(m in r.measures and math.isfinite(r.measures[m].value) for r in runs)
    ]


def spectra_figure(
    densities: Mapping[str, Density], runs: Sequence[RunSummary], settings: str
) -> Figure:
    """``compare --plot``: the runs' spectral densities overlaid (log density), and beside
    them sharpness (the first of :data:`GAP_MEASURES` every run has, with its error bars)
    against the generalisation gap: the paper's two figures. ``settings`` (what was
    measured, e.g. :func:`measurement_label`) goes in the title.
    """
    measures = gap_measures(runs)[:1]
    fig, axes = _figure(1 + len(measures))
    colours = {run.name: _colour(i) for i, run in enumerate(runs)}
    # an arm of several seeds: each of its runs' densities in the arm's colour
    colours.update({name: colours[run.name] for run in runs for name in run.runs})
    _density_panel(axes[0], densities, colours)
    axes[0].set_title("spectral densities", fontsize="medium")
    if measures:
        _gap_panel(axes[1], runs, measures[0], lambda r: (colours[r.name], "o"))
        axes[1].set_title("sharpness against generalisation", fontsize="medium")
    fig.suptitle(
        f"spectra and sharpness of {', '.join(r.name for r in runs)}\n{settings}", fontsize="medium"
    )
    return fig


def sweep_figure(rows: Sequence[SweepRow], title: str) -> Figure:
    """The weight-scaling sweep on log-log axes: each curvature measured (error bars) and
    the loss against the factor a; the accuracy, which scaling a positively homogeneous
    model leaves unchanged, is noted on the loss panel.
    """
    from matplotlib.ticker import NullFormatter

    fig, (curvature, loss) = _figure(2)
    scales = [row.scale for row in rows]
    names = list(rows[0].measures) if rows else []
    for i, name in enumerate(names):
        style = (_colour(i), _MARKERS[i % len(_MARKERS)])
        drawn = [r for r in rows if name in r.measures and r.measures[name].value > 0]
        for row in drawn:
            _errorbar(curvature, row.scale, row.measures[name], style)
        curvature.plot(
            [r.scale for r in drawn],
            [r.measures[name].value for r in drawn],
            color=style[0],
            label=MEASURE_LABELS.get(name, name),
        )
    for ax in (curvature, loss):
        _plain_log(ax)
        ax.set_xticks(scales, [f"{a:g}" for a in scales])
        ax.xaxis.set_minor_formatter(NullFormatter())
    curvature.set_xlabel("weight scale a")
    curvature.set_ylabel("curvature")
    curvature.legend(fontsize="small")
    loss.plot(scales, [row.loss for row in rows], marker="o", color="C3")
    loss.set_xlabel("weight scale a")
    loss.set_ylabel("loss")
    accuracies = [row.accuracy for row in rows]
    if accuracies and max(accuracies) - min(accuracies) < 1e-12:
        note = f"accuracy {accuracies[0]:.1%} at every a"
    elif accuracies:
        note = f"accuracy {min(accuracies):.1%} to {max(accuracies):.1%}"
    else:
        note = "no factor"
    loss.text(0.03, 0.04, note, transform=loss.transAxes, fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return fig


def _last_range(history: RunHistory) -> str:
    """The test accuracy's range over the last LAST_EPOCHS epochs (``91.0-97.0%``)."""
    last = [r.test_accuracy for r in history.records[-LAST_EPOCHS:]]
    return f"{min(last):.1%}-{max(last):.1%}" if len(set(last)) > 1 else f"{last[0]:.1%}"


def curves_figure(histories: Sequence[RunHistory], title: str | None = None) -> Figure:
    """Training curves: loss (log axis) and accuracy against the epoch, train solid and test
    dashed, one colour per run, and the learning rate when recorded. Each run's legend
    entry gives its settings and its test accuracy's range over the last epochs.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    lr = any(math.isfinite(r.lr) and r.lr > 0 for h in histories for r in h.records)
    fig, axes = _figure(3 if lr else 2, width=4.6)
    loss, accuracy = axes[0], axes[1]
    handles = []
    for i, history in enumerate(histories):
        epochs = [r.epoch for r in history.records]
        colour = _colour(i)
        loss.plot(epochs, [r.train_loss for r in history.records], color=colour)
        loss.plot(epochs, [r.test_loss for r in history.records], color=colour, linestyle="--")
        accuracy.plot(epochs, [100 * r.train_accuracy for r in history.records], color=colour)
        accuracy.plot(
            epochs,
            [100 * r.test_accuracy for r in history.records],
            color=colour,
            linestyle="--",
        )
        if lr:
            axes[2].plot(epochs, [r.lr for r in history.records], color=colour)
        words = [str(history.options.get("model") or ""), settings_label(history.options)]
        settings = ", ".join(w for w in words if w)
        last = min(LAST_EPOCHS, len(history.records))
        handles.append(
            Line2D(
                [],
                [],
                color=colour,
                label=f"{history.name}{f': {settings}' if settings else ''}; "
                f"test accuracy over the last {last} epochs {_last_range(history)}",
            )
        )
    handles += [
        Line2D([], [], color="grey", label="train"),
        Line2D([], [], color="grey", linestyle="--", label="test"),
    ]
    _plain_log(loss, "y")
    loss.set_ylabel("loss")
    accuracy.set_ylabel("accuracy (%)")
    if lr:
        axes[2].set_ylabel("learning rate")
        if all(r.lr > 0 for h in histories for r in h.records if math.isfinite(r.lr)):
            _plain_log(axes[2], "y")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(handles=handles, loc="outside lower center", fontsize="small", ncols=2)
    if title is None:
        names = [h.name for h in histories]
        datasets = {str(h.options.get("dataset")) for h in histories if h.options.get("dataset")}
        title = f"training curves: {', '.join(names) if len(names) <= 4 else f'{len(names)} runs'}"
        title += f" on {datasets.pop()}" if len(datasets) == 1 else ""
    fig.suptitle(title, fontsize="medium")
    return fig


def demo_arm(name: str, config: DemoConfig) -> tuple[str, str] | None:
    """The (model, variant) of a demo run's folder name (``mlp-sgd-l2``, or with a seed
    ``mlp-sgd-l2-s1``); None for a name that is no demo run's.
    """
    for model in config.models:
        for variant in VARIANTS:
            if re.fullmatch(rf"{re.escape(model)}-{re.escape(variant)}(-s\d+)?", name):
                return model, variant
    return None


def demo_gap_figure(result: DemoResult) -> Figure:
    """Every demo run's sharpness against its generalisation gap, raw and scale-aware
    (``lambda_max`` and ``lambda_max ||w||^2`` when measured): one colour per variant,
    one marker per model.
    """
    from matplotlib.lines import Line2D

    groups: dict[str, tuple[str, str]] = {}  # run name -> (model, variant)
    runs: dict[str, RunSummary] = {}
    for (model, _), comparison in result.comparisons.items():
        for run in comparison.runs:
            runs.setdefault(run.name, run)
            groups.setdefault(run.name, demo_arm(run.name, result.config) or (model, run.name))
    models = list(dict.fromkeys(model for model, _ in groups.values()))
    variants = list(dict.fromkeys(variant for _, variant in groups.values()))
    measures = gap_measures(list(runs.values()), ("lambda_max", "lambda_max_normalised"))
    fig, axes = _figure(max(1, len(measures)))

    def style(run: RunSummary) -> Style:
        model, variant = groups[run.name]
        return _colour(variants.index(variant)), _MARKERS[models.index(model) % len(_MARKERS)]

    for ax, measure in zip(axes, measures, strict=False):
        _gap_panel(ax, list(runs.values()), measure, style, names=False)
        ax.set_title(_GAP_TITLES.get(measure, ""), fontsize="medium")
    handles = [
        Line2D([], [], color=_colour(i), marker="o", linestyle="none", label=v)
        for i, v in enumerate(variants)
    ]
    handles += [
        Line2D([], [], color="grey", marker=_MARKERS[i % len(_MARKERS)], linestyle="none", label=m)
        for i, m in enumerate(models)
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    config = result.config
    fig.suptitle(
        f"sharpness against generalisation gap: {config.dataset}, {len(runs)} runs "
        f"({', '.join(models)} x {', '.join(variants)}), {config.epochs} epochs",
        fontsize="medium",
    )
    return fig


def demo_spectra_figure(
    result: DemoResult, densities: Mapping[str, Density], settings: str = ""
) -> Figure:
    """The demo runs' spectral densities, one panel per model, its variants overlaid;
    ``settings`` (how they were measured, :func:`measurement_label`) in the title.
    """
    arms = {name: demo_arm(name, result.config) for name in densities}
    models = [m for m in result.config.models if any(a and a[0] == m for a in arms.values())]
    fig, axes = _figure(max(1, len(models)), width=4.6)
    for ax, model in zip(axes, models, strict=False):
        mine = {
            name[len(model) + 1 :]: density
            for name, density in densities.items()
            if (arm := arms[name]) and arm[0] == model
        }
        _density_panel(ax, mine, {v: _colour(i) for i, v in enumerate(mine)})
        ax.set_title(model, fontsize="medium")
    fig.suptitle(
        f"spectral densities of the demo runs on {result.config.dataset}"
        + (f"\n{settings}" if settings else ""),
        fontsize="medium",
    )
    return fig


def demo_figures(
    result: DemoResult,
    folder: Path,
    histories: Mapping[str, RunHistory] | None = None,
    densities: Mapping[str, Density] | None = None,
    spectra_settings: str = "",
) -> list[Path]:
    """Write the demo's figures into ``folder`` and return their paths: sharpness against
    the generalisation gap of every run, the weight-scaling sweep, and, when given, each
    model's training curves (``histories`` by run name) and the spectral densities.
    """
    written = [
        save_figure(demo_gap_figure(result), folder / "sharpness-gap.png"),
        save_figure(
            sweep_figure(
                result.sweep,
                f"weight-scaling sweep of {result.sweep_model}-sgd on {result.config.dataset} "
                f"(all layers scaled; hessian of {result.config.measure_samples or 'all'} "
                "train samples)",
            ),
            folder / "sweep.png",
        ),
    ]
    if densities:
        figure = demo_spectra_figure(result, densities, spectra_settings)
        written.append(save_figure(figure, folder / "spectra.png"))
    for model in result.config.models:
        mine = [
            h
            for name, h in (histories or {}).items()
            if (arm := demo_arm(name, result.config)) and arm[0] == model
        ]
        if mine:
            figure = curves_figure(mine, f"training curves of {model} on {result.config.dataset}")
            written.append(save_figure(figure, folder / f"curves-{model}.png"))
    return written
