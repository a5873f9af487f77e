"""``flatcli plot``: the training curves of one or more runs, from their ``metrics.jsonl``.

Each run folder's epochs are read by :func:`flatcli.workflows.training.read_history`
and drawn by :func:`flatcli.report.plots.curves_figure` (loss and accuracy, train and
test, against the epoch; the learning rate; several runs overlaid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli import options as opt
from flatcli.cli._common import err, handle_errors
from flatcli.errors import FlatcliError, UsageError

#: The example in ``flatcli plot --help``.
EXAMPLE = "Example: flatcli plot runs/mlp-sgd runs/mlp-sgd-l2 --out curves.png"

#: Where the figure of a single run goes without --out: inside its run folder.
CURVES_FILE = "curves.png"


@handle_errors
def plot_command(
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN", help="One or more run folders of flatcli train (read: metrics.jsonl)."
        ),
    ],
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=f"The image to write; its suffix names the format (default RUN/{CURVES_FILE} "
            "for one run; required for several).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
) -> None:
    """Draw training curves: loss and accuracy (train solid, test dashed) and the learning rate
    against the epoch, one colour per run, each run's settings and its test accuracy's range over
    the last epochs in the legend (needs matplotlib: the extra "plot" of flatcli).
    """
    if out_file is None and len(runs) > 1:
        raise UsageError(f"{len(runs)} runs need --out", hint="e.g. --out curves.png")
    from flatcli.report import plots  # torch, as the workflow
    from flatcli.workflows.training import read_history

    plots.image_formats()  # matplotlib, before reading anything
    histories = [read_history(run) for run in runs]
    target = out_file if out_file is not None else runs[0] / CURVES_FILE
    plots.check_plot_path(target, "--out")
    try:
        plots.save_figure(plots.curves_figure(histories), target)
    except (OSError, ValueError) as exc:
        raise FlatcliError(
            f"could not write {target} ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    err.print(
        f"training curves of {len(histories)} run(s): {target}", highlight=False, markup=False
    )
