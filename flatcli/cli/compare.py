"""``flatcli compare``: runs side by side, ratios to the first, and a matrix of computed verdicts.

The command builds a :class:`~flatcli.config.SharpnessConfig` from its options and hands
it, with the runs, to :func:`flatcli.workflows.compare.compare_checkpoints`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from flatcli.cli import options as opt
from flatcli.cli._common import emit, err, handle_errors, is_main, join_world, out
from flatcli.cli.choices import DatasetName
from flatcli.cli.progress import ProgressDisplay
from flatcli.config import (
    ACCURACY_EPOCHS,
    DEFAULT_COMPARE_MEASURES,
    MEASURE_NAMES,
    TIE_SIGMAS,
    SharpnessConfig,
)
from flatcli.errors import FlatcliError, UsageError
from flatcli.workflows.source import CheckpointSource

if TYPE_CHECKING:
    from flatcli.analysis.verdicts import Comparison

#: An arm of the command line: one run, or the runs of several seeds (``A1,A2,A3``).
Arm = Path | tuple[Path, ...]


def parse_arms(args: list[Path]) -> list[Arm]:
    """Each argument as an arm: ``A1,A2,A3`` is one arm of three runs, a plain path (or
    one that exists, commas and all) an arm of one run.
    """
    arms: list[Arm] = []
    for arg in args:
        text = str(arg)
        if "," not in text or arg.exists():
            arms.append(arg)
            continue
        parts = text.split(",")
        if any(not part.strip() for part in parts):
            raise UsageError(
                f"{text!r} names an empty run", hint="join the runs of one arm by commas: A1,A2,A3"
            )
        arms.append(tuple(Path(part.strip()) for part in parts))
    return arms


#: The example in ``flatcli compare --help``.
EXAMPLE = "Example: flatcli compare runs/sgd runs/sgd-l2 runs/gadam --measures lambda_max,trace"


@handle_errors
@opt.measurement_options(without=("target_stderr",))
def compare_command(
    ctx: typer.Context,
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="ARM",
            help="Two or more arms, each a run directory or checkpoint, or the runs of several "
            "seeds of one setting joined by commas (A1,A2,A3: judged by their mean and its "
            "spread); ratios are to the first.",
        ),
    ],
    dataset: Annotated[
        DatasetName | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Measure every run on this data set (default: the one they were trained on; all runs must share it).",
            rich_help_panel=opt.DATA,
        ),
    ] = None,
    data_dir: opt.DataDir = None,
    model_factory: opt.ModelFactory = None,
    factory_arg: opt.FactoryArg = None,
    output: opt.Output = None,
    measures: Annotated[
        str,
        typer.Option(
            help="Comma-separated measures (see flatcli sharpness --help; by default the "
            "paper's and the scale-aware ones)."
            f" Any of: {', '.join(MEASURE_NAMES)}.",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = ",".join(DEFAULT_COMPARE_MEASURES),
    dtype: opt.Dtype = SharpnessConfig.dtype,
    seed: opt.Seed = SharpnessConfig.seed,
    device: opt.Device = opt.DEFAULT_DEVICE,
    no_cache: opt.NoCache = False,
    tie_sigmas: Annotated[
        float,
        typer.Option(
            help="Sharpness differences within this many combined uncertainties are ties.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = TIE_SIGMAS,
    last_epochs: Annotated[
        int,
        typer.Option(
            help="A run's test accuracy is the mean over its last K epochs (metrics.jsonl), its "
            "noise their spread; an averaged run or a checkpoint without history uses its final "
            "accuracy and binomial noise.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = ACCURACY_EPOCHS,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            metavar=opt.FLAG,
            help="After the verdict matrix, the full sentence behind each cell, with the numbers.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Also measure each run's spectral density (SLQ, cached) and draw the densities "
            "overlaid beside sharpness against generalisation gap to this image, e.g. "
            "spectra.png (needs matplotlib).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    format_: opt.Format = None,
    json_: opt.Json = False,
) -> None:
    """Compare runs: optimiser, regularisation, losses, accuracy, ||w||, sharpness (raw and scale-aware),
    ratios to the first run, and a matrix of verdicts (a row per pair, a column per measure) on whether
    flatness agrees with generalisation; --explain adds the sentence behind each verdict.

    Sharpness comes from each run's cached sharpness.json when the settings match, else it is measured.
    Every run and option is checked before anything is measured; runs trained on different data sets are
    refused, and a measure that did not converge gets no verdict.
    """
    fmt = opt.output_format(format_, json_)
    if len(runs) < 2:
        raise UsageError("compare needs at least two runs")
    arms = parse_arms(runs)
    if plot is not None:  # before measuring
        from flatcli.report import plots  # torch

        plots.check_plot_path(plot)
    from flatcli.report.tables import (  # torch, as the workflow
        comparison_table,
        verdict_legend,
        verdict_matrix,
    )
    from flatcli.report.text import compare_as_dict
    from flatcli.workflows.compare import compare_checkpoints
    from flatcli.workflows.provenance import provenance

    # the options named as fields of SharpnessConfig (--split ... --dtype) set them
    config = opt.sharpness_config(ctx, opt.names(measures))
    device = join_world(device)  # under torchrun: this rank's device, after joining the group
    source = opt.checkpoint_source(dataset, data_dir, device, model_factory, factory_arg, output)
    with ProgressDisplay() as display:  # runs i/N, each one's measures (or "cached")
        comparison = compare_checkpoints(
            arms,
            config,
            source,
            use_cache=not no_cache,
            tie_sigmas=tie_sigmas,
            last_epochs=last_epochs,
            progress=display,
        )
    if plot is not None:
        every_run = [r for arm in arms for r in (arm if isinstance(arm, tuple) else (arm,))]
        _draw_spectra(every_run, config, source, comparison, plot, use_cache=not no_cache)

    def draw(console: Console) -> None:
        console.print(comparison_table(comparison))
        console.print(verdict_matrix(comparison))
        console.print(verdict_legend(comparison), highlight=False)
        if explain:
            for verdict in comparison.verdicts:
                console.print(f"- {verdict.text}", highlight=False)

    emit(out, fmt, draw, lambda: compare_as_dict(comparison, provenance(device)))


def _draw_spectra(
    runs: list[Path],
    config: SharpnessConfig,
    source: CheckpointSource,
    comparison: Comparison,
    path: Path,
    *,
    use_cache: bool,
) -> None:
    """``--plot``: measure (or read from the cache) each run's spectral density and draw the
    densities and sharpness against generalisation gap to ``path``.
    """
    from flatcli.report import plots  # torch, imported already
    from flatcli.workflows.compare import run_densities

    with ProgressDisplay() as display:
        densities = run_densities(runs, config, source, use_cache=use_cache, progress=display)
    if not is_main():  # under torchrun rank 0 alone writes files
        return
    settings = plots.measurement_label(config, slq=True)
    try:
        plots.save_figure(plots.spectra_figure(densities, comparison.runs, settings), path)
    except (OSError, ValueError) as exc:
        raise FlatcliError(
            f"could not write {path} ({getattr(exc, 'strerror', None) or exc}); "
            "the measurements are cached: run again to print them"
        ) from None
    err.print(f"spectra figure: {path}", highlight=False, markup=False)
