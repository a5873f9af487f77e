"""The one exception type the library raises for a user's mistake.

The CLI turns a :class:`FlatcliError` into one red line on stderr and a non-zero exit
code; anything else that escapes is a bug. Each error carries a message (what went
wrong) and an optional hint (what to do about it).
"""

from __future__ import annotations

from collections.abc import Sequence


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none):
    enough to say what a library's error was about in one line.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def few(items: Sequence[str], n: int = 3) -> str:
    """``a, b, c and 4 more``: the first ``n`` of a list of names, for a one-line message."""
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


class FlatcliError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(FlatcliError):
    """An option value that cannot be right whatever the files say (exit code 2)."""

    exit_code = 2


class DataError(FlatcliError):
    """A data set that is unknown, missing or malformed."""


class CheckpointError(FlatcliError):
    """A checkpoint that is missing, unreadable or does not match its architecture."""


class RunExistsError(FlatcliError):
    """A run directory that already holds a run and was not meant to be overwritten."""


class OutputError(FlatcliError):
    """A file or folder that cannot be written: read-only, full disk, no permission."""


class TooLargeError(FlatcliError):
    """A computation that would not fit in memory (e.g. a dense Hessian)."""


class UnknownNameError(UsageError):
    """A name (model, data set, measure, optimiser, ...) that no registry knows (exit code 2).

    A name read from a file (a checkpoint's architecture or data set) is the file's
    fault: the loaders turn it into a :class:`CheckpointError` (exit code 1).
    """


class NonFiniteError(FlatcliError):
    """Weights, a loss or a curvature that is NaN or infinite: nothing can be measured there."""
