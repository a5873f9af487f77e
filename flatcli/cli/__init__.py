"""The ``flatcli`` command line: a thin Typer layer over the library.

One module per command (``flatcli.cli.train``, ``.sharpness``, ``.rank_bound``,
``.compare``, ``.demo``, ``.plot``), each defining a ``*_command`` function; the options they share
are declared once in :mod:`flatcli.cli.options`. Importing this package imports no torch:
the commands import the library when they run, so that ``--help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import typer
from rich.markup import escape

from flatcli import __version__
from flatcli.cli import compare, demo, plot, rank_bound, sharpness, train
from flatcli.cli._common import err, fail
from flatcli.cli.compare import compare_command
from flatcli.cli.demo import demo_command
from flatcli.cli.options import CONTEXT, FLAG, Command, Group
from flatcli.cli.plot import plot_command
from flatcli.cli.rank_bound import rank_bound_command
from flatcli.cli.sharpness import sharpness_command
from flatcli.cli.train import train_command

app = typer.Typer(
    name="flatcli",
    help="Train classifiers and measure the curvature of their loss (Granziol 2020, 'Flatness is a False Friend').",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    cls=Group,
    context_settings=CONTEXT,
)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        metavar=FLAG,
        help="Print the version and exit.",
        is_eager=True,
        callback=_print_version,
    ),
    threads: int = typer.Option(
        0,
        "--threads",
        envvar="FLATCLI_THREADS",
        min=0,
        help="CPU threads for torch (0: torch's default). On a machine that other jobs "
        "keep busy, 1 avoids OpenMP spin-wait slow-downs.",
    ),
) -> None:
    """Train classifiers and measure the curvature of their loss."""
    if threads:
        most = 4 * (os.cpu_count() or 1)
        if threads > most:  # OpenMP aborts (or segfaults) when asked for absurd pools
            fail(f"--threads {threads} is more than 4x this machine's {os.cpu_count()} CPUs", 2)
        import torch  # only when asked for: --help stays fast

        torch.set_num_threads(threads)


#: The commands in the order of ``flatcli --help``: name -> (function, the example its help ends with).
COMMANDS: dict[str, tuple[Callable[..., None], str]] = {
    "train": (train_command, train.EXAMPLE),
    "sharpness": (sharpness_command, sharpness.EXAMPLE),
    "rank-bound": (rank_bound_command, rank_bound.EXAMPLE),
    "compare": (compare_command, compare.EXAMPLE),
    "demo": (demo_command, demo.EXAMPLE),
    "plot": (plot_command, plot.EXAMPLE),
}
# Each command takes -h as well as --help, and ends its help with an example.
for _name, (_function, _example) in COMMANDS.items():
    app.command(_name, cls=Command, context_settings=CONTEXT, epilog=_example)(_function)


def main() -> None:
    """The console script: like ``app()``, but a usage error is one line on stderr, exit code 2.

    Under ``torchrun`` the process ends with ``os._exit`` once its output is flushed and
    the process group is left: the C++ destructors of gloo's background threads can
    otherwise abort an interpreter that is shutting down ("terminate called without an
    active exception", SIGABRT) after the command has succeeded.
    """
    code = _run()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


#: What Typer's validator puts before the message of a rejected choice
#: ("Invalid value for '--curvature': Value error, 'x' is not one of 'hessian', 'ggn'.").
_VALIDATOR_NOISE = "Value error, "


def _run() -> int:
    """Run the app; the exit code."""
    try:
        code = app(standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except typer.TyperException as exc:  # the parser's own errors: a bad option, a missing argument
        if not exc.format_message():  # bare `flatcli`: the help was the message
            return exc.exit_code
        message = exc.format_message().replace(_VALIDATOR_NOISE, "")
        err.print(f"[bold red]error:[/] {escape(message)} (see flatcli --help)", highlight=False)
        return exc.exit_code
    except typer.Abort:  # Ctrl-C at a prompt
        return 130
    return code if isinstance(code, int) else 0
