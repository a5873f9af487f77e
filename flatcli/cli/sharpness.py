"""``flatcli sharpness``: curvature of a checkpoint's training loss, with error bars."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli import options as opt
from flatcli.cli._common import err, handle_errors, is_main, join_world, out, print_json
from flatcli.config import MEASURE_NAMES, SharpnessConfig
from flatcli.errors import FlatcliError, UsageError

MeasuresOpt = Annotated[
    str, typer.Option("--measures", help=f"Comma-separated, any of: {', '.join(MEASURE_NAMES)}.")
]


def build_config(measures: str, **options) -> SharpnessConfig:
    names = tuple(m.strip() for m in measures.split(",") if m.strip())
    return SharpnessConfig(measures=names, **options)


Split = Annotated[str, typer.Option(help="train or test.")]
Samples = Annotated[
    int | None, typer.Option(help="Measure on a deterministic subset of N images.")
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="Images per forward pass (memory; with --bn-mode batch also the statistics). Default: on the CPU as many as keep a batch's activations within 8 MiB (32 to 1024), else 1024; with --bn-mode batch always 1024."
    ),
]
MemoryGb = Annotated[
    float,
    typer.Option(
        help="Memory budget for a block of Hessian-vector products (vmap chunk size, keeping gradient graphs)."
    ),
]
CurvatureOpt = Annotated[str, typer.Option(help="hessian or ggn (generalised Gauss-Newton).")]
BnMode = Annotated[
    str,
    typer.Option(
        help="BatchNorm: eval (running statistics), batch (statistics of each batch of --batch-size, default 1024 whatever the machine or memory: the batch size defines the matrix and is recorded as bn_batch_size; as the paper's authors) or full (statistics of the whole measured set, one batch of all samples)."
    ),
]
IncludeL2 = Annotated[
    bool, typer.Option(help="Add the checkpoint's coupled L2 coefficient times the identity.")
]
Exact = Annotated[bool, typer.Option(help="Dense matrix and its eigenvalues (small models only).")]
Tol = Annotated[
    float,
    typer.Option(
        help="Lanczos: stop when the Ritz residual is below tol * |lambda| (0 < tol < 1). A run stopped by --max-iter first is reported as not converged."
    ),
]
MaxIter = Annotated[int, typer.Option(help="Lanczos: most iterations.")]
Probes = Annotated[
    int,
    typer.Option(
        help="Trace/Frobenius: Hessian-vector products (block Krylov Hutch++; both share them). At least 4; under 13 the standard error rests on fewer than 10 samples and is reported as not converged."
    ),
]
TargetStderr = Annotated[
    float | None,
    typer.Option(
        help="Trace/Frobenius: add probes until the relative standard error is at most this (e.g. 0.01; at most 10x --probes in all)."
    ),
]
Dtype = Annotated[str, typer.Option(help="float32 or float64.")]
Rho = Annotated[
    float,
    typer.Option(
        help="adaptive_sharpness: relative noise scale rho (perturbation |w| * N(0, rho^2))."
    ),
]
LogitNormalise = Annotated[
    bool,
    typer.Option(
        help="adaptive_sharpness: normalise the logits (scale-invariant for linear models)."
    ),
]
ModelFactory = opt.ModelFactory  # declared once in options.py, with --factory-arg and --output
DatasetOverride = Annotated[
    str | None, typer.Option("--dataset", "-d", help="Data set (default: the checkpoint's).")
]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Recompute even if sharpness.json has the result.")
]


@handle_errors
def sharpness(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint (.safetensors; with --model-factory also .pt/.pth/.bin or a Lightning .ckpt) or a run directory."
        ),
    ],
    measures: MeasuresOpt = "lambda_max,trace,frobenius",
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
    target_stderr: TargetStderr = None,
    rho: Rho = 0.05,
    logit_normalise: LogitNormalise = False,
    seed: opt.Seed = 0,
    dtype: Dtype = "float32",
    device: opt.Device = "auto",
    per_layer: Annotated[
        bool, typer.Option(help="Also measure each layer's diagonal block.")
    ] = False,
    scale: Annotated[
        str | None,
        typer.Option(help="Weight-scaling sweep: comma-separated factors, e.g. 0.5,1,2,4,8."),
    ] = None,
    scale_layer: Annotated[
        str, typer.Option(help="Sweep: scale all layers or only the last.")
    ] = "all",
    data_dir: opt.DataDir = None,
    dataset: DatasetOverride = None,
    model_factory: opt.ModelFactory = None,
    factory_arg: opt.FactoryArg = None,
    output: opt.Output = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw the density to this PNG (needs matplotlib).")
    ] = None,
    density_out: Annotated[
        Path | None, typer.Option(help="Write the density points to this CSV.")
    ] = None,
    no_cache: NoCache = False,
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
        target_stderr=target_stderr,
        seed=seed,
        dtype=dtype,
        per_layer=per_layer,
        rho=rho,
        logit_normalise=logit_normalise,
    )
    loading = {
        "model_factory": model_factory,
        "factory_args": opt.factory_args(factory_arg),
        "output": output,
    }
    if scale is not None:
        if plot is not None or density_out is not None:
            raise UsageError("--plot and --density-out do not apply to a --scale sweep")
        _sweep(checkpoint, config, scale, scale_layer, dataset, data_dir, device, loading, json_)
        return
    if (plot or density_out) and "density" not in config.measures:
        raise UsageError("--plot and --density-out need 'density' in --measures")
    for option, path in (
        ("--plot", plot),
        ("--density-out", density_out),
    ):  # before any computation
        if path is not None:
            check_output_path(path, option)
    if plot is not None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise UsageError(
                "--plot needs matplotlib", hint="pip install 'flatcli[plot]'"
            ) from None
        formats = Figure().canvas.get_supported_filetypes()
        if plot.suffix.lstrip(".").lower() not in formats:
            raise UsageError(
                f"--plot {plot}: unknown image format {plot.suffix or '(none)'}",
                hint=f"use one of: {', '.join('.' + f for f in sorted(formats))}",
            )

    from flatcli.workflows.sharpness import (
        sharpness as run_sharpness,
    )  # torch: imported once the options are checked

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
        state = {"hvps": 0, "estimate": ""}

        def show(**change) -> None:  # HVPs done and the current estimate
            state.update(change)
            bar.update(task, description=f"measuring: {state['hvps']} HVPs  {state['estimate']}")

        report = run_sharpness(
            checkpoint,
            config,
            dataset=dataset,
            data_dir=str(data_dir) if data_dir else None,
            device=device,
            **loading,
            use_cache=not no_cache,
            progress=lambda n: show(hvps=n),
            status=lambda text: show(estimate=text),
        )

    if report.cached:
        _say_cached(report, checkpoint)
    _print_report(report, config, json_)
    density = report.measures.get("density")
    failed = []  # the result is printed first: a file that cannot be written never costs it
    if not is_main():  # under torchrun rank 0 alone writes files
        density = None
    if density is not None and density_out is not None:
        try:
            density_out.write_text(
                "eigenvalue,density\n"
                + "".join(f"{g!r},{v!r}\n" for g, v in zip(density.grid, density.values))
            )
        except OSError as exc:
            failed.append(f"{density_out} ({exc.strerror or exc})")
    if density is not None and plot is not None:
        try:
            _plot(density, plot)
        except (OSError, ValueError) as exc:
            failed.append(f"{plot} ({getattr(exc, 'strerror', None) or exc})")
    if failed:
        raise FlatcliError(f"could not write {' and '.join(failed)}; the result is printed above")


def check_output_path(path: Path, option: str) -> None:
    """A file that can be created: not a folder, in a folder that exists (UsageError, exit 2)."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder", hint="give a file name")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UsageError(f"{option} {path}: the folder {parent} {what}", hint="create it first")


def _say_cached(report, checkpoint: Path) -> None:
    from flatcli.workflows.sharpness import cache_file

    where = cache_file(checkpoint)
    if report.fully_cached:
        err.print(f"cached result from {where}; --no-cache recomputes", highlight=False)
    else:
        err.print(
            f"cached {', '.join(report.cached)} from {where} (the rest measured now); --no-cache recomputes",
            highlight=False,
        )


def _print_report(report, config, json_: bool) -> None:
    density = report.measures.get("density")
    if config.target_stderr is not None:  # said on stderr, so that --json stays one document
        for name in ("trace", "frobenius"):
            est = report.measures.get(name)
            if (
                est is not None
                and est.value
                and est.uncertainty > config.target_stderr * abs(est.value)
            ):
                err.print(
                    f"note: {name} reached a relative standard error of {est.uncertainty / abs(est.value):.3g}, "
                    f"not {config.target_stderr:g}: the budget of 10 x --probes = {10 * config.probes} "
                    "products ran out; raise --probes"
                )
    if json_:
        print_json(report.as_dict())
        return
    from flatcli.report.tables import density_histogram, layers_table, sharpness_table

    out.print(sharpness_table(report))
    if report.layers:
        out.print(layers_table(report))
    if density is not None:
        out.print(density_histogram(density.grid, density.values), highlight=False)


def _sweep(
    checkpoint, config, scale, scale_layer, dataset, data_dir, device, loading, json_
) -> None:
    from flatcli.analysis.sweep import parse_scales, scaling_sweep
    from flatcli.report.tables import sweep_table
    from flatcli.workflows.sharpness import load_point

    scales = parse_scales(scale)
    device = join_world(device)
    point = load_point(
        checkpoint,
        split=config.split,
        samples=config.samples,
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        device=device,
        **loading,
    )
    rows = scaling_sweep(
        point.model, point.inputs, point.targets, scales, config, layers=scale_layer
    )
    if json_:
        print_json([row.as_dict() for row in rows])
        return
    out.print(sweep_table(rows, scale_layer))


def _plot(density, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(density.grid, [max(v, 1e-12) for v in density.values])
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
