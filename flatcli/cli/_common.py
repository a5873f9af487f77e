"""What every command shares: the two consoles, error handling, JSON output."""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from ..errors import FlatcliError

#: Tables and results for people go to stdout; progress, warnings and errors to stderr,
#: so that with ``--json`` stdout holds exactly one JSON document.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def handle_errors(command: Callable) -> Callable:
    """Turn a :class:`FlatcliError` into one red line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return command(*args, **kwargs)
            except FlatcliError as exc:
                fail(_escape(str(exc)), exc.exit_code)
            except KeyboardInterrupt:
                fail("interrupted", 130)
            finally:
                for w in caught:
                    if not _ours(w):
                        continue
                    err.print(f"[yellow]warning:[/] {_escape(str(w.message).splitlines()[0])}", highlight=False)

    return wrapper


def _ours(w: warnings.WarningMessage) -> bool:
    """Show flatcli's own warnings (and RuntimeWarnings such as NaN weights), not libraries' deprecations."""
    import os

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return issubclass(w.category, RuntimeWarning) or os.path.abspath(w.filename).startswith(package)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def print_json(document: Any) -> None:
    """Write one JSON document on stdout (plain print: no Rich wrapping or colour)."""
    print(json.dumps(_jsonable(document), indent=2))


def parse_kwargs(items: list[str] | None) -> dict:
    """``key=value`` pairs (values parsed as JSON when they can be) into a dict."""
    from ..errors import UsageError

    result = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--model-arg {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            result[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            result[key.replace("-", "_")] = raw
    return result
