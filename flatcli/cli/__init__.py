"""The ``flatcli`` command line: a thin Typer layer over the library."""

from __future__ import annotations

import typer

from flatcli.cli import compare as _compare
from flatcli.cli import demo as _demo
from flatcli.cli import rank_bound as _rank_bound
from flatcli.cli import sharpness as _sharpness
from flatcli.cli import train as _train

app = typer.Typer(
    name="flatcli",
    help="Train classifiers and measure the curvature of their loss (Granziol 2020, 'Flatness is a False Friend').",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from flatcli import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
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
        import os

        most = 4 * (os.cpu_count() or 1)
        if threads > most:  # OpenMP aborts (or segfaults) when asked for absurd pools
            from flatcli.cli._common import fail

            fail(f"--threads {threads} is more than 4x this machine's {os.cpu_count()} CPUs", 2)
        import torch

        torch.set_num_threads(threads)


app.command("train")(_train.train)
app.command("sharpness")(_sharpness.sharpness)
app.command("rank-bound")(_rank_bound.rank_bound)
app.command("compare")(_compare.compare)
app.command("demo")(_demo.demo)


def main() -> None:
    """The console script: like ``app()``, but a usage error is one line on stderr, exit code 2.

    Under ``torchrun`` the process ends with ``os._exit`` once its output is flushed and
    the process group is left: the C++ destructors of gloo's background threads can
    otherwise abort an interpreter that is shutting down ("terminate called without an
    active exception", SIGABRT) after the command has succeeded.
    """
    import os
    import sys

    code = _run()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run() -> int:
    """Run the app; the exit code."""
    from flatcli.cli._common import err

    try:
        code = app(standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # the CLI parser's own errors carry format_message and exit_code
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            from rich.markup import escape

            if not exc.format_message():  # bare `flatcli`: the help was the message
                return exc.exit_code
            err.print(
                f"[bold red]error:[/] {escape(exc.format_message())} (see flatcli --help)",
                highlight=False,
            )
            return exc.exit_code
        if type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
            return 130
        raise
    return code if isinstance(code, int) else 0
