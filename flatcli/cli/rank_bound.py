"""``flatcli rank-bound``: the paper's Hessian rank bound against the measured rank."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from flatcli.cli import options as opt
from flatcli.cli._common import emit, handle_errors, join_world, out
from flatcli.cli.progress import ProgressDisplay
from flatcli.config import RANK_FRACTION, RANK_MAX_PARAMS, RANK_SEED
from flatcli.errors import UsageError

#: The example in ``flatcli rank-bound --help``.
EXAMPLE = "Example: flatcli rank-bound runs/digits-logreg-sgd-s0 --samples 500"


@handle_errors
def rank_bound_command(
    checkpoint: opt.Checkpoint,
    samples: opt.Samples = None,
    dataset: opt.DatasetOverride = None,
    data_dir: opt.DataDir = None,
    model_factory: opt.ModelFactory = None,
    factory_arg: opt.FactoryArg = None,
    output: opt.Output = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Numerical rank: eigenvalues above this fraction of max|lambda| (default P * eps, as numpy.linalg.matrix_rank).",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = None,
    exact: Annotated[
        bool | None,
        typer.Option(
            "--exact/--estimate",
            metavar=opt.FLAG,
            help="Dense float64 ranks, or an SLQ estimate of the effective rank (default: exact "
            f"when P <= {RANK_MAX_PARAMS}).",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = None,
    fraction: Annotated[
        float,
        typer.Option(
            help="Estimate: effective rank counts |lambda| above this fraction of lambda_max.",
            rich_help_panel=opt.ESTIMATOR,
        ),
    ] = RANK_FRACTION,
    seed: opt.Seed = RANK_SEED,
    device: opt.Device = opt.DEFAULT_DEVICE,
    format_: opt.Format = None,
    json_: opt.Json = False,
) -> None:
    """Hessian rank bound (C-1) * sum over layers of (fan_in + 1), the data bound N(C-1), and the measured rank.

    The bound is exact for linear models (logistic regression; for deep linear nets, for the GGN); for
    nonlinear nets it bounds the effective rank under a Kronecker-factored approximation. Both are reported.
    """
    from flatcli.report.tables import rank_table  # torch, as the workflow
    from flatcli.report.text import rank_as_dict, rank_statement
    from flatcli.workflows.provenance import provenance
    from flatcli.workflows.rank import rank_checkpoint

    fmt = opt.output_format(format_, json_)
    if samples is not None and samples < 1:
        raise UsageError(f"samples must be positive, got {samples}")
    device = join_world(device)  # under torchrun: this rank's device, after joining the group
    source = opt.checkpoint_source(dataset, data_dir, device, model_factory, factory_arg, output)
    with ProgressDisplay() as display:  # the dense matrices' P products, or the SLQ probes
        report = rank_checkpoint(
            checkpoint,
            source,
            samples=samples,
            exact=exact,
            threshold=threshold,
            fraction=fraction,
            seed=seed,
            progress=display,
        )

    def draw(console: Console) -> None:
        for table in rank_table(report):
            console.print(table)
        statement = rank_statement(report.bound, report.measured, report.is_linear)
        console.print(statement, highlight=False)

    emit(out, fmt, draw, lambda: rank_as_dict(report, provenance(device)))
