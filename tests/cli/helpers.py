"""Helpers of the command tests: a runner, a recorder standing in for the library
function a command calls, a 100-column console, and the one-line error check.
"""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from unittest import mock

from rich.console import Console
from typer.testing import CliRunner

from flatcli.cli import app, main

runner = CliRunner()

#: The width help is rendered at in the tests (Rich reads COLUMNS).
HELP_COLUMNS = 100


def invoke(*args: object):
    """Run ``flatcli ARGS`` in-process (stdout and stderr apart)."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(HELP_COLUMNS)})


@dataclass
class Outcome:
    """What the console script did: its exit code and its two streams."""

    exit_code: int
    stdout: str
    stderr: str


def invoke_main(*args: object) -> Outcome:
    """Run ``flatcli ARGS`` as the console script does (:func:`flatcli.cli.main`): the
    parser's own errors (a bad option, a value not among the choices) are one line there.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["flatcli", *(str(a) for a in args)]
    with mock.patch.object(sys, "argv", argv), redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(code, stdout.getvalue(), stderr.getvalue())


def wide_console() -> Console:
    """A 100-column console without colour that keeps what it printed (``export_text``)."""
    return Console(width=100, record=True, file=io.StringIO(), color_system=None)


def rendered(*things: object) -> str:
    """What a 100-column console prints for ``things``."""
    console = wide_console()
    for thing in things:
        console.print(thing, highlight=False)
    return console.export_text()


@dataclass
class Calls:
    """The calls a patched function received: each an (args, kwargs) pair."""

    returns: object = None
    calls: list[tuple[tuple, dict]] = field(default_factory=list)

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls.append((args, kwargs))
        return self.returns

    @property
    def one(self) -> tuple[tuple, dict]:
        """The only call (fails when there were none or several)."""
        assert len(self.calls) == 1, f"called {len(self.calls)} times"
        return self.calls[0]


def one_line_error(result, code: int, *fragments: str) -> None:
    """The command failed with ``code``, nothing on stdout and one line on stderr holding
    every fragment.
    """
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
