"""The ``flatcli`` command line: a thin Typer layer over the library."""

from __future__ import annotations

import typer

from . import compare as _compare
from . import demo as _demo
from . import rank_bound as _rank_bound
from . import sharpness as _sharpness
from . import train as _train

app = typer.Typer(
    name="flatcli",
    help="Train classifiers and measure the curvature of their loss (Granziol 2020, 'Flatness is a False Friend').",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Train classifiers and measure the curvature of their loss."""


app.command("train")(_train.train)
app.command("sharpness")(_sharpness.sharpness)
app.command("rank-bound")(_rank_bound.rank_bound)
app.command("compare")(_compare.compare)
app.command("demo")(_demo.demo)


def main() -> None:
    app()
