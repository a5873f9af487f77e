"""Fixtures of the command tests: a spy for the library function a command calls, and
a recording console in place of a command's stdout.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
from rich.console import Console

from .helpers import Calls, wide_console


@pytest.fixture
def spy(monkeypatch) -> Callable[[str, str, object], Calls]:
    """``spy("flatcli.workflows.sharpness", "checkpoint_sharpness", returns)``: replace a module's
    function (which a command looks up when it runs) by a recorder returning ``returns``.
    """

    def install(module: str, name: str, returns: object = None) -> Calls:
        calls = Calls(returns)
        target = importlib.import_module(module)
        assert callable(getattr(target, name))  # the name exists: a typo must not pass
        monkeypatch.setattr(target, name, calls)
        return calls

    return install


@pytest.fixture
def screen(monkeypatch) -> Callable[[str], Console]:
    """``screen("flatcli.cli.sharpness")``: the command module's stdout console replaced by
    a recording 100-column one, returned.
    """

    def install(module: str) -> Console:
        console = wide_console()
        monkeypatch.setattr(importlib.import_module(module), "out", console)
        return console

    return install
