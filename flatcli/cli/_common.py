"""What every command shares: the two consoles, error handling, the output in each --format."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from flatcli.errors import FlatcliError
from flatcli.report.formats import RENDERERS, Collector
from flatcli.report.schema import is_document

P = ParamSpec("P")
R = TypeVar("R")

#: The folder of the flatcli package: warnings raised from files under it are flatcli's own.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: This process's rank under ``torchrun`` (0 otherwise), read from the environment so that
#: the consoles are set before torch is imported.
def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK") or 0) if int(os.environ.get("WORLD_SIZE") or 1) > 1 else 0
    except ValueError:  # not torchrun's doing: joining the group will say what is wrong
        return 0


RANK = _env_rank()

#: Tables and results for people go to stdout; progress, warnings and errors to stderr,
#: so that with ``--json`` stdout holds exactly one JSON document. Under ``torchrun`` only
#: rank 0 speaks: the other ranks' consoles are quiet (their own failures excepted, see :func:`fail`).
#: Piped to a file or a pager, tables are laid out for 100 columns (rich's default there
#: is 80, which folds their labels); a terminal, or COLUMNS, says its own width.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 100
out = Console(soft_wrap=True, quiet=RANK != 0, width=_PIPED_WIDTH)
err = Console(stderr=True, soft_wrap=True, quiet=RANK != 0)


def is_main() -> bool:
    """Rank 0 of a torchrun (or the only process): the one that prints and writes files."""
    return RANK == 0


def fail(message: str, code: int = 1) -> NoReturn:
    """Say ``message`` as one red line on stderr and exit with ``code``.

    Under ``torchrun`` a rank other than 0 says its own failure (prefixed with its rank);
    an option error (code 2) is rank 0's alone to say.
    """
    if RANK != 0 and code != 2:  # this rank's own failure; an option error is rank 0's to say
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] rank {RANK}: {message}", highlight=False
        )
        raise typer.Exit(code)
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def join_world(device: str) -> str:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group, NCCL on CUDA and gloo
    on the CPU, and return this rank's device (``cuda:LOCAL_RANK`` for auto/cuda when CUDA is
    available); otherwise ``device`` unchanged. The group is left when the command ends
    (:func:`handle_errors`).
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return device
    from flatcli import distributed  # torch: imported only under torchrun

    distributed.init(device)
    return distributed.device_for(device)


def _leave_world(together: bool = False) -> None:
    """Leave the process group, if joined; ``together``: after a command that succeeded, wait
    for the other processes first (see :func:`flatcli.distributed.finish`).
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        from flatcli import distributed  # torch, imported already

        distributed.finish(wait=together)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`FlatcliError` into one red line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = command(*args, **kwargs)
                _leave_world(together=True)
                return result
            except FlatcliError as exc:
                _say_warnings(caught)  # what led up to the error, before it
                fail(escape(str(exc)), exc.exit_code)
            except KeyboardInterrupt:
                _say_warnings(caught)
                fail("interrupted", 130)
            finally:
                _leave_world()
                _say_warnings(caught)

    return wrapper


def _say_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print flatcli's own recorded warnings as yellow lines, once (the list is emptied)."""
    for w in caught:
        if _ours(w):
            err.print(
                f"[yellow]warning:[/] {escape(str(w.message).splitlines()[0])}", highlight=False
            )
    caught.clear()


def _ours(w: warnings.WarningMessage) -> bool:
    """Show flatcli's own warnings (and RuntimeWarnings such as NaN weights), not libraries' deprecations."""
    return issubclass(w.category, RuntimeWarning) or os.path.abspath(w.filename).startswith(
        PACKAGE_DIR
    )


def _jsonable(value: object) -> object:
    """``value`` with what JSON cannot hold made plain: non-finite floats, paths, tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def print_json(document: Mapping[str, object]) -> None:
    """Write one JSON document on stdout (plain print: no Rich wrapping or colour); rank 0 only.

    Every document is in the envelope of :mod:`flatcli.report.schema` (built by
    :func:`~flatcli.report.schema.document`); anything else is a programming error.
    """
    if not is_document(document):
        raise ValueError("print_json prints only documents of flatcli.report.schema.document")
    if not is_main():
        return
    print(json.dumps(_jsonable(document), indent=2))


def emit(
    console: Console,
    fmt: str,
    draw: Callable[[Console], None],
    document: Callable[[], Mapping[str, object]],
) -> None:
    """Print a command's result in ``fmt`` (``--format``), the one way every command prints it.

    ``table``: ``draw`` prints on ``console``; ``markdown``/``csv``: what ``draw`` prints is
    collected and converted (:mod:`flatcli.report.formats`, rank 0 only); ``json``:
    :func:`print_json` of ``document()``.
    """
    if fmt == "json":
        print_json(document())
    elif fmt in RENDERERS:
        collector = Collector()
        draw(collector)
        if is_main():
            print(RENDERERS[fmt](collector.blocks), end="")
    else:
        draw(console)
