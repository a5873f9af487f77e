"""``flatcli demo``: the paper's contrasts on the embedded digits data, in a few minutes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from flatcli.cli import options as opt
from flatcli.cli._common import emit, err, handle_errors, out
from flatcli.cli.choices import ARM_NAMES, MODEL_NAMES, PROTOCOL_MODEL_NAMES, ProtocolName
from flatcli.cli.progress import ProgressDisplay
from flatcli.config import RECIPES, DemoConfig, SharpnessConfig
from flatcli.errors import FlatcliError, UsageError, first_line

if TYPE_CHECKING:
    from flatcli.workflows.demo import DemoResult
    from flatcli.workflows.protocol import ProtocolResult

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
        str | None,
        typer.Option(
            help=f"Comma-separated, any of: {', '.join(MODEL_NAMES)} (default "
            f"{','.join(DemoConfig.models)}); with --protocol paper any of: "
            f"{', '.join(PROTOCOL_MODEL_NAMES)} (default all).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help=f"Epochs per run (default {DemoConfig.epochs}; with --protocol paper the recipes' "
            f"{RECIPES['paper-sgd']['epochs']}).",
            rich_help_panel=opt.OPTIMISER,
        ),
    ] = None,
    max_iter: Annotated[
        int | None,
        typer.Option(
            help=f"With --protocol paper: most Lanczos steps (default {SharpnessConfig.max_iter}).",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = None,
    probes: Annotated[
        int | None,
        typer.Option(
            help=f"With --protocol paper: Hutch++ vectors of the trace (default {SharpnessConfig.probes}).",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = None,
    density_iterations: Annotated[
        int | None,
        typer.Option(
            help="With --protocol paper: SLQ steps of the spectral density "
            f"(default {SharpnessConfig.density_iterations}).",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = None,
    memory_gb: Annotated[
        float | None,
        typer.Option(
            help="With --protocol paper: memory budget of a Hessian-vector product "
            f"(default {SharpnessConfig.memory_gb:g}; PreResNet-110 needs about 2 GiB per 64 images).",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = None,
    seed: opt.Seed = DemoConfig.seed,
    seeds: Annotated[
        int,
        typer.Option(
            help="Train each variant with this many seeds (--seed, --seed + 1, ...) and judge the "
            "contrasts on their means and spread; the first seed's runs are those of a one-seed demo.",
            rich_help_panel=opt.OPTIMISER,
        ),
    ] = DemoConfig.seeds,
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
            metavar=opt.FLAG,
            help="Retrain runs that exist with other settings.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = DemoConfig.overwrite,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            metavar=opt.FLAG,
            help="After the claims, the details: runs compared, verdict matrices, rank tables, sweep.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    no_plots: Annotated[
        bool,
        typer.Option(
            "--no-plots",
            metavar=opt.FLAG,
            help="Write no figures (by default: training curves, sharpness against generalisation "
            "gap, the sweep and the spectra, as PNG files in --out; needs matplotlib).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    protocol: Annotated[
        ProtocolName,
        typer.Option(
            help="demo: the contrasts above on small models; paper: the paper's protocol (each model "
            "x arm trained with its paper-* recipe, measured on the training set with BatchNorm "
            "batch statistics, printed beside the published numbers), after printing the plan "
            "and its estimated time.",
            rich_help_panel=opt.OPTIMISER,
        ),
    ] = "demo",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            metavar=opt.FLAG,
            help="With --protocol paper: print the plan (and its time estimate) and stop.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    no_estimate: Annotated[
        bool,
        typer.Option(
            "--no-estimate",
            metavar=opt.FLAG,
            help="With --protocol paper: skip the timed warm-up (the plan shows no times).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    arms: Annotated[
        str | None,
        typer.Option(
            help=f"With --protocol paper: comma-separated arms, any of: {', '.join(ARM_NAMES)} "
            "(default all).",
            rich_help_panel=opt.OPTIMISER,
        ),
    ] = None,
    format_: opt.Format = None,
    json_: opt.Json = False,
) -> None:
    """Train the paper's contrasts (with/without L2; SGD vs Gadam) for each model, compare their sharpness
    and generalisation, check the rank bound, sweep the weight scale, and say which claims held (first;
    the numbers behind them with --verbose or --json).
    """
    fmt = opt.output_format(format_, json_)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # N copies would train into one folder
        raise UsageError(
            "flatcli demo runs in one process, not under torchrun",
            hint="run train, sharpness, rank-bound and compare under torchrun instead",
        )
    protocol_only = {
        "--dry-run": dry_run,
        "--no-estimate": no_estimate,
        "--arms": arms,
        "--max-iter": max_iter,
        "--probes": probes,
        "--density-iterations": density_iterations,
        "--memory-gb": memory_gb,
    }
    if protocol == "paper":
        if seeds != DemoConfig.seeds:
            raise UsageError("--seeds is the demo's", hint="the paper's protocol trains one seed")
        _paper_protocol(
            dataset=dataset,
            data_dir=str(data_dir) if data_dir else None,
            models=opt.names(models) if models is not None else None,
            arms=opt.names(arms) if arms is not None else None,
            epochs=epochs,
            train_samples=train_samples,
            samples=samples,
            estimators={
                "max_iter": max_iter,
                "probes": probes,
                "density_iterations": density_iterations,
            },
            memory_gb=memory_gb,
            folder=out_dir if out_dir != DemoConfig.out else None,
            seed=seed,
            device=device,
            overwrite=overwrite,
            estimate=not no_estimate,
            dry_run=dry_run,
            fmt=fmt,
            plots=not no_plots,
        )
        return
    given = [name for name, value in protocol_only.items() if value not in (None, False)]
    if given:
        raise UsageError(
            f"{', '.join(given)} only applies to the paper's protocol",
            hint="add --protocol paper",
        )
    from flatcli.report.tables import demo_report  # torch
    from flatcli.report.text import demo_as_dict
    from flatcli.workflows.demo import run_demo

    config = DemoConfig(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        models=opt.names(models) if models is not None else DemoConfig.models,
        epochs=epochs if epochs is not None else DemoConfig.epochs,
        train_samples=train_samples,
        measure_samples=samples,
        out=out_dir / dataset if out_dir == DemoConfig.out else out_dir,
        seed=seed,
        seeds=seeds,
        device=device,
        overwrite=overwrite,
    )
    with ProgressDisplay() as display:  # a line per stage (trained or reused), bars within
        result = run_demo(
            config, on_step=lambda message: display.say(message, style="dim"), progress=display
        )
    if not no_plots:
        _write_figures(result)
    emit(
        out,
        fmt,
        lambda console: demo_report(console, result, verbose=verbose),
        lambda: demo_as_dict(result),
    )


def _paper_protocol(
    *,
    dataset: str,
    data_dir: str | None,
    models: tuple[str, ...] | None,
    arms: tuple[str, ...] | None,
    epochs: int | None,
    train_samples: int | None,
    samples: int | None,
    estimators: dict[str, int | None],
    memory_gb: float | None,
    folder: Path | None,
    seed: int,
    device: str,
    overwrite: bool,
    estimate: bool,
    dry_run: bool,
    fmt: str,
    plots: bool,
) -> None:
    """``--protocol paper``: the plan (timed unless not ``estimate``) before anything
    trains, on stdout with tables (stderr otherwise: stdout holds one document); then, unless
    ``dry_run``, every run trained and measured, each density drawn (if ``plots``), and
    the results beside the paper's. ``folder``: ``--out``; None: not given (the protocol's
    default, as for the other arguments).
    """
    from flatcli.report import protocol as report  # torch
    from flatcli.workflows.protocol import (
        ProtocolConfig,
        estimate_plan,
        plan_protocol,
        run_protocol,
    )

    defaults = ProtocolConfig()
    config = ProtocolConfig(
        dataset=dataset,
        data_dir=data_dir,
        models=models or defaults.models,
        arms=arms or defaults.arms,
        epochs=epochs,
        train_samples=train_samples,
        samples=samples,
        out=folder if folder is not None else defaults.out / dataset,
        seed=seed,
        device=device,
        overwrite=overwrite,
        estimate=estimate,
        memory_gb=memory_gb if memory_gb is not None else defaults.memory_gb,
        **{k: v for k, v in estimators.items() if v is not None},
    )
    with ProgressDisplay() as display:
        plan = plan_protocol(config)
        if config.estimate:
            plan = estimate_plan(plan, on_step=lambda message: display.say(message, style="dim"))
    if dry_run:
        emit(
            out,
            fmt,
            lambda console: report.print_plan(console, plan),
            lambda: report.plan_as_dict(plan),
        )
        return
    report.print_plan(out if fmt == "table" else err, plan)
    with ProgressDisplay() as display:
        result = run_protocol(
            plan, on_step=lambda message: display.say(message, style="dim"), progress=display
        )
    if plots:
        _protocol_figures(result)
    emit(
        out,
        fmt,
        lambda console: report.protocol_report(console, result),
        lambda: report.protocol_as_dict(result),
    )


def _protocol_figures(result: ProtocolResult) -> None:
    """Each run's spectral density in ``out/figures``, and one line on stderr naming the
    folder; without matplotlib, or when a figure cannot be written, one line says so (the
    measurements are kept, exit 0).
    """
    from flatcli.report import plots  # torch, imported already
    from flatcli.report.protocol import protocol_figures

    if not plots.available():
        err.print(
            "figures skipped: matplotlib is not installed (pip install 'flatcli[plot]'; "
            "--no-plots leaves them out)",
            highlight=False,
        )
        return
    folder = result.plan.config.out / "figures"
    try:
        written = protocol_figures(result, folder)
    except (FlatcliError, OSError, ValueError) as exc:
        err.print(
            f"[yellow]warning:[/] figures not written: {escape(first_line(exc))}", highlight=False
        )
        return
    err.print(f"spectral densities in {folder}: {len(written)} figures", highlight=False)


#: The spectra of the demo's figures: SLQ with these probes and steps on this many training
#: samples (or the demo's --samples, if fewer), a few seconds per run on digits where the
#: measurement settings of the tables would take a minute for the CNN; cached in each run.
DEMO_SPECTRA_SAMPLES = 300
DEMO_SPECTRA_PROBES = 4
DEMO_SPECTRA_ITERATIONS = 40


def _write_figures(result: DemoResult) -> None:
    """The demo's figures (:func:`flatcli.report.plots.demo_figures`) in its folder, and one
    line on stderr naming them. They come after the measurements, which are kept whatever
    happens here: without matplotlib, or when a figure cannot be written, one line says so
    and the demo goes on (exit 0).
    """
    from flatcli.report import plots  # torch, imported already
    from flatcli.workflows.compare import run_densities
    from flatcli.workflows.source import CheckpointSource
    from flatcli.workflows.training import read_history

    if not plots.available():
        err.print(
            "figures skipped: matplotlib is not installed (pip install 'flatcli[plot]'; "
            "--no-plots leaves them out)",
            highlight=False,
            markup=False,
        )
        return
    config = result.config
    err.print("[dim]figures: measuring the spectral densities (then cached), drawing...[/]")
    try:
        histories = {name: read_history(path) for name, path in result.runs.items()}
        spectra = SharpnessConfig(
            measures=("density",),
            samples=min(config.measure_samples or DEMO_SPECTRA_SAMPLES, DEMO_SPECTRA_SAMPLES),
            density_probes=DEMO_SPECTRA_PROBES,
            density_iterations=DEMO_SPECTRA_ITERATIONS,
        )
        densities = run_densities(
            list(result.runs.values()),
            spectra,
            CheckpointSource(data_dir=config.data_dir, device=config.device),
        )
        written = plots.demo_figures(
            result, config.out, histories, densities, plots.measurement_label(spectra, slq=True)
        )
    except (FlatcliError, OSError, ValueError) as exc:
        err.print(
            f"[yellow]warning:[/] figures not written: {escape(first_line(exc))}", highlight=False
        )
        return
    names = ", ".join(p.name for p in written)
    err.print(f"figures in {config.out}: {names}", highlight=False, markup=False)
