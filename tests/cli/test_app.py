"""The ``flatcli`` app itself: its commands, --version and --threads."""

from __future__ import annotations

import pytest
import typer.main

import flatcli
from flatcli.cli import app
from flatcli.cli.options import MEASUREMENT_OPTIONS
from flatcli.config import SharpnessConfig

from .fakes import DEMO
from .helpers import invoke, one_line_error


def test_each_command_is_a_distinctly_named_function():
    group = typer.main.get_command(app)
    commands = {name: cmd.callback.__wrapped__.__name__ for name, cmd in group.commands.items()}
    assert commands == {
        "train": "train_command",
        "sharpness": "sharpness_command",
        "rank-bound": "rank_bound_command",
        "compare": "compare_command",
        "demo": "demo_command",
        "plot": "plot_command",
    }


@pytest.mark.parametrize("command, without", [("sharpness", ()), ("compare", ("target_stderr",))])
def test_the_measurement_options_follow_measures_with_the_config_defaults(command, without):
    params = typer.main.get_command(app).commands[command].params
    names = [p.name for p in params]
    declared = [name for name in MEASUREMENT_OPTIONS if name not in without]
    start = names.index("measures") + 1
    assert names[start : start + len(declared)] == declared
    assert not set(without) & set(names)
    defaults = {p.name: p.default for p in params}
    assert {n: defaults[n] for n in declared} == {n: getattr(SharpnessConfig, n) for n in declared}


@pytest.mark.parametrize("command", ["train", "sharpness", "rank-bound", "compare", "demo"])
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage: " in result.stdout and "--json" in result.stdout


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"{flatcli.__version__}\n"


def test_threads_sets_torch_threads_before_the_command(spy):
    threads = spy("torch", "set_num_threads")
    demo = spy("flatcli.workflows.demo", "run_demo", DEMO)
    assert invoke("--threads", 3, "demo", "--json").exit_code == 0
    assert threads.one == ((3,), {}) and len(demo.calls) == 1


def test_no_threads_option_leaves_torch_alone(spy):
    threads = spy("torch", "set_num_threads")
    spy("flatcli.workflows.demo", "run_demo", DEMO)
    assert invoke("demo", "--json").exit_code == 0
    assert threads.calls == []


def test_an_absurd_thread_count_is_one_line(spy):
    threads = spy("torch", "set_num_threads")
    one_line_error(invoke("--threads", 100_000, "demo"), 2, "--threads 100000 is more than 4x")
    assert threads.calls == []
