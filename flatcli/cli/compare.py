"""``flatcli compare``: runs side by side, ratios to the first, and computed verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli import options as opt
from flatcli.cli._common import err, handle_errors, join_world, out, print_json
from flatcli.cli.sharpness import (
    BatchSize,
    BnMode,
    CurvatureOpt,
    Dtype,
    Exact,
    IncludeL2,
    LogitNormalise,
    MaxIter,
    MemoryGb,
    NoCache,
    Probes,
    Rho,
    Samples,
    Split,
    Tol,
    build_config,
)
from flatcli.workflows.compare import (
    DEFAULT_COMPARE_MEASURES,
    compare_checkpoints,
    comparison_as_dict,
)


@handle_errors
def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Two or more run directories or checkpoints; ratios are to the first."),
    ],
    measures: Annotated[
        str, typer.Option(help="Comma-separated measures (see flatcli sharpness --help).")
    ] = ",".join(DEFAULT_COMPARE_MEASURES),
    split: Split = "train",
    samples: Samples = None,
    batch_size: BatchSize = None,
    memory_gb: MemoryGb = 2.0,
    curvature: CurvatureOpt = "hessian",
    bn_mode: BnMode = "eval",
    include_l2: IncludeL2 = False,
    exact: Exact = False,
    tol: Tol = 1e-4,
    max_iter: MaxIter = 100,
    probes: Probes = 99,
    rho: Rho = 0.05,
    logit_normalise: LogitNormalise = False,
    tie_sigmas: Annotated[
        float,
        typer.Option(
            help="Sharpness differences within this many combined uncertainties are ties."
        ),
    ] = 2.0,
    seed: opt.Seed = 0,
    dtype: Dtype = "float32",
    device: opt.Device = "auto",
    data_dir: opt.DataDir = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Measure every run on this data set (default: the one they were trained on; all runs must share it).",
        ),
    ] = None,
    model_factory: opt.ModelFactory = None,
    factory_arg: opt.FactoryArg = None,
    output: opt.Output = None,
    no_cache: NoCache = False,
    json_: opt.Json = False,
) -> None:
    """Compare runs: optimiser, regularisation, losses, accuracy, ||w||, sharpness (raw and scale-aware),
    ratios to the first run, and for each pair a verdict on whether flatness agrees with generalisation.

    Sharpness comes from each run's cached sharpness.json when the settings match, else it is measured.
    Every run and option is checked before anything is measured; runs trained on different data sets are
    refused, and a measure that did not converge gets no verdict.
    """
    if len(runs) < 2:
        from flatcli.errors import UsageError

        raise UsageError("compare needs at least two runs")
    config = build_config(
        measures,
        split=split,
        samples=samples,
        batch_size=batch_size,
        memory_gb=memory_gb,
        curvature=curvature,
        bn_mode=bn_mode,
        include_l2=include_l2,
        exact=exact,
        tol=tol,
        max_iter=max_iter,
        probes=probes,
        seed=seed,
        dtype=dtype,
        rho=rho,
        logit_normalise=logit_normalise,
    )
    device = join_world(
        device
    )  # under torchrun: this rank's device, after joining the process group
    from rich.progress import (
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )  # not needed for --help

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("measuring", total=None)
        comparison = compare_checkpoints(
            runs,
            config,
            data_dir=str(data_dir) if data_dir else None,
            device=device,
            use_cache=not no_cache,
            tie_sigmas=tie_sigmas,
            dataset=dataset,
            model_factory=model_factory,
            factory_args=opt.factory_args(factory_arg),
            output=output,
            progress=lambda n: bar.update(task, description=f"measuring: {n} HVPs"),
        )
    if json_:
        print_json(comparison_as_dict(comparison))
        return
    from flatcli.report.tables import comparison_table

    out.print(comparison_table(comparison))
    for verdict in comparison.verdicts:
        out.print(f"- {verdict.text}", highlight=False)
