"""``flatcli sharpness``: curvature of a checkpoint's training loss, with error bars."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..errors import UsageError
from ..measures import MEASURES, SharpnessConfig
from ..sharpness import sharpness as run_sharpness
from . import options as opt
from ._common import err, handle_errors, out, print_json

MeasuresOpt = Annotated[str, typer.Option(
    "--measures", help=f"Comma-separated, any of: {', '.join(MEASURES)}.")]


def build_config(measures: str, split: str, samples, batch_size, curvature, bn_mode, include_l2, exact, tol,
                 max_iter, probes, seed, dtype, per_layer, rho: float = 0.05) -> SharpnessConfig:
    names = tuple(m.strip() for m in measures.split(",") if m.strip())
    return SharpnessConfig(measures=names, split=split, samples=samples, batch_size=batch_size,
                           curvature=curvature, bn_mode=bn_mode, include_l2=include_l2, exact=exact, tol=tol,
                           max_iter=max_iter, probes=probes, seed=seed, dtype=dtype, per_layer=per_layer, rho=rho)


@handle_errors
def sharpness(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.safetensors) or a run directory.")],
    measures: MeasuresOpt = "lambda_max,trace,frobenius",
    split: Annotated[str, typer.Option(help="train or test.")] = "train",
    samples: Annotated[Optional[int], typer.Option(help="Measure on a deterministic subset of N images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (memory).")] = 2048,
    curvature: Annotated[str, typer.Option(help="hessian or ggn (generalised Gauss-Newton).")] = "hessian",
    bn_mode: Annotated[str, typer.Option(help="BatchNorm: eval (running statistics) or batch (batch statistics, as the paper's authors).")] = "eval",
    include_l2: Annotated[bool, typer.Option(help="Add the checkpoint's coupled L2 coefficient times the identity.")] = False,
    exact: Annotated[bool, typer.Option(help="Dense matrix and its eigenvalues (small models only).")] = False,
    tol: Annotated[float, typer.Option(help="Lanczos: stop when the Ritz residual is below tol * |lambda|.")] = 1e-4,
    max_iter: Annotated[int, typer.Option(help="Lanczos: most iterations.")] = 100,
    probes: Annotated[int, typer.Option(help="Trace/Frobenius: random probe vectors (Hutch++).")] = 99,
    seed: opt.Seed = 0,
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: opt.Device = "auto",
    per_layer: Annotated[bool, typer.Option(help="Also measure each layer's diagonal block.")] = False,
    data_dir: opt.DataDir = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Data set (default: the checkpoint's).")] = None,
    model_factory: Annotated[Optional[str], typer.Option(help="MODULE:FUNCTION building the nn.Module of a plain safetensors state dict.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Draw the density to this PNG (needs matplotlib).")] = None,
    density_out: Annotated[Optional[Path], typer.Option(help="Write the density points to this CSV.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute even if sharpness.json has the result.")] = False,
    json_: opt.Json = False,
) -> None:
    """Measure the curvature (Hessian eigenvalues, trace, Frobenius norm, spectrum) of the training loss."""
    config = build_config(measures, split, samples, batch_size, curvature, bn_mode, include_l2, exact, tol,
                          max_iter, probes, seed, dtype, per_layer)
    if (plot or density_out) and "density" not in config.measures:
        raise UsageError("--plot and --density-out need 'density' in --measures")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib", hint="pip install 'flatcli[plot]'") from None

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("measuring", total=None)
        report = run_sharpness(checkpoint, config, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                               device=device, model_factory=model_factory, use_cache=not no_cache,
                               progress=lambda n: bar.update(task, description=f"measuring: {n} HVPs"))

    density = report.measures.get("density")
    if density is not None and density_out is not None:
        density_out.write_text("eigenvalue,density\n" + "".join(f"{g!r},{v!r}\n" for g, v in zip(density.grid, density.values)))
    if density is not None and plot is not None:
        _plot(density, plot)
    if json_:
        print_json(report.as_dict())
        return
    from ..render import density_histogram, layers_table, sharpness_table

    out.print(sharpness_table(report))
    if report.layers:
        out.print(layers_table(report))
    if density is not None:
        out.print(density_histogram(density.grid, density.values), highlight=False)


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
