"""``flatcli sharpness``: curvature of a checkpoint's training loss, with error bars.

The command builds a :class:`~flatcli.config.SharpnessConfig` from its options and hands
it, with the :class:`~flatcli.workflows.source.CheckpointSource` of its loading options,
to :func:`flatcli.workflows.sharpness.checkpoint_sharpness` (or, with ``--scale``, to the
weight-scaling sweep :func:`flatcli.analysis.sweep.scaling_sweep`); the tables, the CSV
file and the figure come from :mod:`flatcli.report`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from flatcli.cli import options as opt
from flatcli.cli._common import emit, err, handle_errors, is_main, join_world, out
from flatcli.cli.choices import ScaleLayer
from flatcli.cli.progress import ProgressDisplay
from flatcli.config import SharpnessConfig
from flatcli.errors import FlatcliError, UsageError
from flatcli.workflows.source import CheckpointSource

if TYPE_CHECKING:
    from flatcli.analysis.sharpness_report import Density, SharpnessReport
    from flatcli.analysis.sweep import SweepRow


#: The example in ``flatcli sharpness --help``.
EXAMPLE = (
    "Example: flatcli sharpness runs/digits-mlp-sgd-s0 --measures lambda_max,trace --curvature ggn"
)


@handle_errors
@opt.measurement_options()
def sharpness_command(
    ctx: typer.Context,
    checkpoint: opt.Checkpoint,
    dataset: opt.DatasetOverride = None,
    data_dir: opt.DataDir = None,
    model_factory: opt.ModelFactory = None,
    factory_arg: opt.FactoryArg = None,
    output: opt.Output = None,
    measures: opt.Measures = opt.DEFAULT_MEASURES,
    dtype: opt.Dtype = SharpnessConfig.dtype,
    per_layer: Annotated[
        bool,
        typer.Option(
            metavar=opt.FLAG,
            help="Also measure each layer's diagonal block.",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = SharpnessConfig.per_layer,
    scale: Annotated[
        str | None,
        typer.Option(
            help="Weight-scaling sweep: comma-separated factors, e.g. 0.5,1,2,4,8.",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = None,
    scale_layer: Annotated[
        ScaleLayer,
        typer.Option(
            help="Sweep: scale all layers or only the last.", rich_help_panel=opt.ESTIMATOR
        ),
    ] = "all",
    seed: opt.Seed = SharpnessConfig.seed,
    device: opt.Device = opt.DEFAULT_DEVICE,
    no_cache: opt.NoCache = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Draw the density (--measures density) or, with --scale, the sweep to this "
            "image, e.g. plot.png (needs matplotlib).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    density_out: Annotated[
        Path | None,
        typer.Option(help="Write the density points to this CSV.", rich_help_panel=opt.OUTPUT),
    ] = None,
    format_: opt.Format = None,
    json_: opt.Json = False,
) -> None:
    """Measure the curvature of the training loss: Hessian eigenvalues, trace, Frobenius norm, spectrum,
    and measures that see through the scale of the weights.

    lambda_max / lambda_min: Lanczos with full reorthogonalisation, the Ritz residual as the error bound.
    trace: block Krylov Hutch++; frobenius: sqrt(Tr H^2) from the same products; each with a standard
    error. density: stochastic Lanczos quadrature. lambda_max_normalised / trace_normalised: times ||w||^2. adaptive_sharpness:
    E over d ~ |w| * N(0, rho^2) of L(w + d) - L(w) (Kwon et al. 2021; Andriushchenko et al. 2023).
    relative_flatness: sum over s, s' of <w_s, w_s'> Tr(H_ss') of the last layer (Petzka et al. 2021).
    """
    fmt = opt.output_format(format_, json_)
    # the options named as fields of SharpnessConfig (--split ... --dtype) set them
    config = opt.sharpness_config(ctx, opt.names(measures))
    source = opt.checkpoint_source(dataset, data_dir, device, model_factory, factory_arg, output)
    if scale is not None:
        if density_out is not None:
            raise UsageError(
                "--density-out does not apply to a --scale sweep", hint="--plot draws the sweep"
            )
        if plot is not None:  # before measuring
            from flatcli.report import plots  # torch

            plots.check_plot_path(plot)
        scale_sweep(checkpoint, config, scale, scale_layer, source, fmt, plot)
        return
    if (plot or density_out) and "density" not in config.measures:
        raise UsageError("--plot and --density-out need 'density' in --measures")
    for option, path in (("--plot", plot), ("--density-out", density_out)):  # before measuring
        if path is not None:
            check_output_path(path, option)
    from flatcli.analysis.sharpness_report import Density  # torch: once the options are checked
    from flatcli.report import plots
    from flatcli.workflows.sharpness import checkpoint_sharpness

    if plot is not None:
        plots.check_plot_path(plot)
    # under torchrun: this rank's device, after joining the group
    source = replace(source, device=join_world(device))
    with ProgressDisplay() as display:  # a task per piece of work, the estimate beside it
        report = checkpoint_sharpness(
            checkpoint,
            config,
            source,
            use_cache=not no_cache,
            progress=display,
            status=display.status,
        )

    if report.cached:
        _say_cached(report, checkpoint)
    found = report.measures.get("density")
    density = found if isinstance(found, Density) else None
    _print_report(report, density, config, fmt)
    if is_main() and density is not None:  # under torchrun rank 0 alone writes files
        _write_density(density, density_out, plot, report)


def check_output_path(path: Path, option: str) -> None:
    """A file that can be created: not a folder, in a folder that exists (UsageError, exit 2)."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder", hint="give a file name")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UsageError(f"{option} {path}: the folder {parent} {what}", hint="create it first")


def _write_density(
    density: Density, csv_path: Path | None, plot: Path | None, report: SharpnessReport
) -> None:
    """Write the density's CSV and figure; the result is printed first, so that a file that
    cannot be written never costs it: the failures are one error at the end.
    """
    from flatcli.report import csv, plots  # torch, imported already

    failed = []
    if csv_path is not None:
        try:
            csv.write_density_csv(density, csv_path)
        except OSError as exc:
            failed.append(f"{csv_path} ({exc.strerror or exc})")
    if plot is not None:
        try:
            plots.save_figure(plots.density_figure(density, report), plot)
        except (OSError, ValueError) as exc:
            failed.append(f"{plot} ({getattr(exc, 'strerror', None) or exc})")
    if failed:
        raise FlatcliError(f"could not write {' and '.join(failed)}; the result is printed above")


def _say_cached(report: SharpnessReport, checkpoint: Path) -> None:
    from flatcli.workflows.cache import cache_file  # torch, imported already

    where = cache_file(checkpoint)
    if report.fully_cached:
        err.print(f"cached result from {where}; --no-cache recomputes", highlight=False)
    else:
        err.print(
            f"cached {', '.join(report.cached)} from {where} (the rest measured now); --no-cache recomputes",
            highlight=False,
        )


def _print_report(
    report: SharpnessReport, density: Density | None, config: SharpnessConfig, fmt: str
) -> None:
    from flatcli.curvature.results import Estimate  # torch, imported already
    from flatcli.report.tables import density_histogram, layers_table, sharpness_table
    from flatcli.report.text import sharpness_as_dict

    if config.target_stderr is not None:  # said on stderr, so that --json stays one document
        for name in ("trace", "frobenius"):
            est = report.measures.get(name)
            if (
                isinstance(est, Estimate)
                and est.value
                and est.uncertainty > config.target_stderr * abs(est.value)
            ):
                err.print(
                    f"note: {name} reached a relative standard error of {est.uncertainty / abs(est.value):.3g}, "
                    f"not {config.target_stderr:g}: the budget of 10 x --probes = {10 * config.probes} "
                    "products ran out; raise --probes"
                )

    def draw(console: Console) -> None:
        console.print(sharpness_table(report))
        if report.layers:
            console.print(layers_table(report))
        if density is not None:
            console.print(density_histogram(density), highlight=False)

    emit(out, fmt, draw, lambda: sharpness_as_dict(report))


def scale_sweep(
    checkpoint: Path,
    config: SharpnessConfig,
    scales: str,
    layers: str,
    source: CheckpointSource,
    fmt: str,
    plot: Path | None = None,
) -> None:
    """``--scale``: the measures of ``config`` with the weights (of ``layers``) times each
    factor; ``plot``: the sweep drawn to this image after the result is printed.
    """
    from flatcli.analysis.sweep import parse_scales, scaling_sweep  # torch
    from flatcli.report.tables import sweep_table
    from flatcli.report.text import sweep_as_dict
    from flatcli.workflows.provenance import provenance
    from flatcli.workflows.sharpness import load_point

    factors = parse_scales(scales)
    source = replace(source, device=join_world(source.device))
    point = load_point(checkpoint, source, split=config.split, samples=config.samples)
    with ProgressDisplay() as display:  # points i/len(factors), each one's measures
        rows = scaling_sweep(
            point.model,
            point.inputs,
            point.targets,
            factors,
            config,
            layers=layers,
            progress=display,
        )
    emit(
        out,
        fmt,
        lambda console: console.print(sweep_table(rows, layers)),
        lambda: sweep_as_dict(rows, layers, config.split, provenance(source.device)),
    )
    if plot is not None and is_main():  # under torchrun rank 0 alone writes files
        _draw_sweep(rows, plot, checkpoint, layers, config, len(point.targets))


def _draw_sweep(
    rows: list[SweepRow],
    path: Path,
    checkpoint: Path,
    layers: str,
    config: SharpnessConfig,
    samples: int,
) -> None:
    """Draw the sweep to ``path``; the result is printed first, so a failure is one error after it."""
    from flatcli.report import plots  # torch, imported already

    scaled = "all layers" if layers == "all" else f"the {layers} layer"
    title = (
        f"weight-scaling sweep of {plots.run_name(checkpoint)} ({scaled} scaled)\n"
        f"{plots.measurement_label(config, samples)}"
    )
    try:
        plots.save_figure(plots.sweep_figure(rows, title), path)
    except (OSError, ValueError) as exc:
        raise FlatcliError(
            f"could not write {path} ({getattr(exc, 'strerror', None) or exc}); the result is printed above"
        ) from None
    err.print(f"sweep figure: {path}", highlight=False, markup=False)
