"""``flatcli compare``: runs side by side, ratios to the first, and a matrix of computed verdicts.

The command builds a :class:`~flatcli.config.SharpnessConfig` from its options and hands
it, with the runs, to :func:`flatcli.workflows.compare.compare_checkpoints`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli import options as opt
from flatcli.cli._common import handle_errors, join_world, out, print_json, spinner
from flatcli.cli.choices import DatasetName
from flatcli.config import DEFAULT_COMPARE_MEASURES, MEASURE_NAMES, TIE_SIGMAS, SharpnessConfig
from flatcli.errors import UsageError

#: The example in ``flatcli compare --help``.
EXAMPLE = "Example: flatcli compare runs/sgd runs/sgd-l2 runs/gadam --measures lambda_max,trace"


@handle_errors
@opt.measurement_options(without=("target_stderr",))
def compare_command(
    ctx: typer.Context,
    runs: Annotated[
        list[Path],
        typer.Argument(help="Two or more run directories or checkpoints; ratios are to the first."),
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
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="After the verdict matrix, the full sentence behind each cell, with the numbers.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    json_: opt.Json = False,
) -> None:
    """Compare runs: optimiser, regularisation, losses, accuracy, ||w||, sharpness (raw and scale-aware),
    ratios to the first run, and a matrix of verdicts (a row per pair, a column per measure) on whether
    flatness agrees with generalisation; --explain adds the sentence behind each verdict.

    Sharpness comes from each run's cached sharpness.json when the settings match, else it is measured.
    Every run and option is checked before anything is measured; runs trained on different data sets are
    refused, and a measure that did not converge gets no verdict.
    """
    if len(runs) < 2:
        raise UsageError("compare needs at least two runs")
    from flatcli.report.tables import (  # torch, as the workflow
        VERDICT_LEGEND,
        comparison_table,
        verdict_matrix,
    )
    from flatcli.workflows.compare import compare_checkpoints, comparison_as_dict
    from flatcli.workflows.provenance import provenance

    # the options named as fields of SharpnessConfig (--split ... --dtype) set them
    config = opt.sharpness_config(ctx, opt.names(measures))
    device = join_world(device)  # under torchrun: this rank's device, after joining the group
    source = opt.checkpoint_source(dataset, data_dir, device, model_factory, factory_arg, output)
    with spinner() as bar:
        task = bar.add_task("measuring", total=None)
        comparison = compare_checkpoints(
            runs,
            config,
            source,
            use_cache=not no_cache,
            tie_sigmas=tie_sigmas,
            progress=lambda n: bar.update(task, description=f"measuring: {n} HVPs"),
        )
    if json_:
        print_json(comparison_as_dict(comparison, provenance(device)))
        return
    out.print(comparison_table(comparison))
    out.print(verdict_matrix(comparison))
    out.print(VERDICT_LEGEND, highlight=False)
    if explain:
        for verdict in comparison.verdicts:
            out.print(f"- {verdict.text}", highlight=False)
