"""``flatcli rank-bound``: the paper's Hessian rank bound against the measured rank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli import options as opt
from flatcli.cli._common import handle_errors, join_world, out, print_json
from flatcli.cli.sharpness import DatasetOverride, Samples


@handle_errors
def rank_bound(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint (.safetensors; with --model-factory also .pt/.pth/.bin or a Lightning .ckpt) or a run directory."
        ),
    ],
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Numerical rank: eigenvalues above this fraction of max|lambda| (default P * eps, as numpy.linalg.matrix_rank)."
        ),
    ] = None,
    exact: Annotated[
        bool | None,
        typer.Option(
            "--exact/--estimate",
            help="Dense float64 ranks, or an SLQ estimate of the effective rank (default: exact when P <= 4096).",
        ),
    ] = None,
    fraction: Annotated[
        float,
        typer.Option(
            help="Estimate: effective rank counts |lambda| above this fraction of lambda_max."
        ),
    ] = 1e-2,
    samples: Samples = None,
    seed: opt.Seed = 0,
    device: opt.Device = "auto",
    data_dir: opt.DataDir = None,
    dataset: DatasetOverride = None,
    model_factory: opt.ModelFactory = None,
    factory_arg: opt.FactoryArg = None,
    output: opt.Output = None,
    json_: opt.Json = False,
) -> None:
    """Hessian rank bound (C-1) * sum over layers of (fan_in + 1), the data bound N(C-1), and the measured rank.

    The bound is exact for linear models (logistic regression; for deep linear nets, for the GGN); for
    nonlinear nets it bounds the effective rank under a Kronecker-factored approximation. Both are reported.
    """
    from flatcli.analysis.rank import check_rank_options, rank_report
    from flatcli.errors import UsageError
    from flatcli.report.tables import rank_table
    from flatcli.workflows.sharpness import load_point

    check_rank_options(
        threshold=threshold, fraction=fraction
    )  # before anything is loaded or computed
    if samples is not None and samples < 1:
        raise UsageError(f"samples must be positive, got {samples}")
    device = join_world(
        device
    )  # under torchrun: this rank's device, after joining the process group
    point = load_point(
        checkpoint,
        samples=samples,
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        device=device,
        model_factory=model_factory,
        factory_args=opt.factory_args(factory_arg),
        output=output,
    )
    num_classes = int(point.info.dataset.get("num_classes") or _num_classes(point))
    report = rank_report(
        point.model,
        point.inputs,
        point.targets,
        num_classes,
        exact=exact,
        threshold=threshold,
        fraction=fraction,
        seed=seed,
    )
    if json_:
        print_json(report.as_dict())
        return
    for table in rank_table(report):
        out.print(table)
    out.print(report.statement, highlight=False)


def _num_classes(point) -> int:
    from flatcli.workflows.data import get_spec

    return get_spec(point.dataset).num_classes
