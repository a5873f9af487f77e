"""``flatcli demo``: the paper's contrasts on the embedded digits data, in a few minutes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli import options as opt
from flatcli.cli._common import err, handle_errors, out, print_json
from flatcli.cli.choices import MODEL_NAMES
from flatcli.config import DemoConfig
from flatcli.errors import UsageError

#: The example in ``flatcli demo --help``.
EXAMPLE = "Example: flatcli demo --models logreg,mlp --epochs 10 --out demo"


@handle_errors
def demo_command(
    dataset: opt.Dataset = DemoConfig.dataset,
    data_dir: opt.DataDir = None,
    train_samples: Annotated[
        int | None,
        typer.Option(help="Train on a deterministic subset.", rich_help_panel=opt.DATA),
    ] = DemoConfig.train_samples,
    samples: Annotated[
        int | None,
        typer.Option(help="Measure curvature on a deterministic subset.", rich_help_panel=opt.DATA),
    ] = DemoConfig.measure_samples,
    models: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated, any of: {', '.join(MODEL_NAMES)}.", rich_help_panel=opt.MODEL
        ),
    ] = ",".join(DemoConfig.models),
    epochs: Annotated[
        int, typer.Option(help="Epochs per run.", rich_help_panel=opt.OPTIMISER)
    ] = DemoConfig.epochs,
    seed: opt.Seed = DemoConfig.seed,
    device: opt.Device = opt.DEFAULT_DEVICE,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the demo's runs (reused when the settings match).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = DemoConfig.out,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Retrain runs that exist with other settings.", rich_help_panel=opt.OUTPUT
        ),
    ] = DemoConfig.overwrite,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="After the claims, the details: runs compared, verdict matrices, rank tables, sweep.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    json_: opt.Json = False,
) -> None:
    """Train the paper's contrasts (with/without L2; SGD vs Gadam) for each model, compare their sharpness
    and generalisation, check the rank bound, sweep the weight scale, and say which claims held (first;
    the numbers behind them with --verbose or --json).
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # N copies would train into one folder
        raise UsageError(
            "flatcli demo runs in one process, not under torchrun",
            hint="run train, sharpness, rank-bound and compare under torchrun instead",
        )
    from flatcli.report.tables import demo_report  # torch
    from flatcli.report.text import demo_as_dict
    from flatcli.workflows.demo import run_demo

    config = DemoConfig(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        models=opt.names(models),
        epochs=epochs,
        train_samples=train_samples,
        measure_samples=samples,
        out=out_dir / dataset if out_dir == DemoConfig.out else out_dir,
        seed=seed,
        device=device,
        overwrite=overwrite,
    )
    result = run_demo(
        config, on_step=lambda message: err.print(f"[dim]{message}...[/]", highlight=False)
    )
    if json_:
        print_json(demo_as_dict(result))
        return
    demo_report(out, result, verbose=verbose)
