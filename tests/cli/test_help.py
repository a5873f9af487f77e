"""``--help``: ``-h``, option panels, choices Typer shows and checks, an example per command."""

from __future__ import annotations

import re

import pytest
import typer.main

from flatcli.cli import app, choices
from flatcli.cli import options as opt
from flatcli.config import BN_MODES, CURVATURE_NAMES, DTYPE_NAMES

from .helpers import HELP_COLUMNS, invoke, invoke_main, one_line_error, runner

COMMANDS = ["train", "sharpness", "rank-bound", "compare", "demo"]

#: The panels of each command's options, in the order of every command (Typer's "Options"
#: panel holds only -h).
PANELS = {
    "train": [opt.DATA, opt.MODEL, opt.OPTIMISER, opt.PROCESSES, opt.OUTPUT],
    "sharpness": [opt.DATA, opt.MODEL, opt.ESTIMATOR, opt.PROCESSES, opt.OUTPUT],
    "rank-bound": [opt.DATA, opt.MODEL, opt.ESTIMATOR, opt.PROCESSES, opt.OUTPUT],
    "compare": [opt.DATA, opt.MODEL, opt.ESTIMATOR, opt.PROCESSES, opt.OUTPUT],
    "demo": [opt.DATA, opt.MODEL, opt.OPTIMISER, opt.ESTIMATOR, opt.PROCESSES, opt.OUTPUT],
}

#: The options with a closed set of values, per command, and the values.
CHOICES = {
    "train": {
        "model": choices.MODEL_NAMES,
        "dataset": choices.DATASET_NAMES,
        "optimizer": ("sgd", "adam", "adamw"),
        "schedule": ("constant", "cosine", "paper"),
        "recipe": choices.RECIPE_NAMES,
    },
    "sharpness": {
        "dataset": choices.DATASET_NAMES,
        "split": ("train", "test"),
        "curvature": CURVATURE_NAMES,
        "bn_mode": BN_MODES,
        "dtype": DTYPE_NAMES,
        "scale_layer": ("all", "last"),
    },
    "rank-bound": {"dataset": choices.DATASET_NAMES},
    "compare": {
        "dataset": choices.DATASET_NAMES,
        "split": ("train", "test"),
        "curvature": CURVATURE_NAMES,
        "bn_mode": BN_MODES,
        "dtype": DTYPE_NAMES,
    },
    "demo": {"dataset": choices.DATASET_NAMES, "protocol": ("demo", "paper")},
}

for _offered in CHOICES.values():  # every command prints in each --format
    _offered["format_"] = choices.FORMAT_NAMES

#: Choices short enough that their ``<a|b>`` is never wrapped in a 100-column help.
SHORT = ["<hessian|ggn>", "<eval|batch|full>", "<float32|float64>", "<train|test>"]


def _help(*command: str) -> str:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def _panels(text: str) -> list[str]:
    """The titles of the help's boxes, in order."""
    return re.findall(r"╭─ (.+?) ─", text)


def test_dash_h_is_help_on_the_app():
    result = invoke("-h")
    assert result.exit_code == 0 and result.stdout == _help()
    assert "Usage: " in result.stdout and "-h" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_dash_h_is_help_on_every_command(command):
    result = invoke(command, "-h")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == _help(command) and "Usage: flatcli " + command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_in_a_panel_and_the_panels_keep_one_order(command):
    text = _help(command)
    assert max(len(line) for line in text.splitlines()) == HELP_COLUMNS  # rendered at 100
    arguments = ["Arguments"] if command in ("sharpness", "rank-bound", "compare") else []
    assert _panels(text) == [*arguments, "Options", *PANELS[command]]
    params = typer.main.get_command(app).commands[command].params
    unpanelled = {p.name for p in params if getattr(p, "rich_help_panel", None) is None}
    assert unpanelled <= {"checkpoint", "runs", "help"}


def test_the_same_option_is_in_the_same_panel_on_every_command():
    group = typer.main.get_command(app)
    seen: dict[str, set[str]] = {}
    for command in COMMANDS:
        for p in group.commands[command].params:
            panel = getattr(p, "rich_help_panel", None)
            if panel is not None:
                seen.setdefault(p.name, set()).add(panel)
    # train's --batch-size is the SGD mini-batch; a measurement's is images per forward pass
    assert {name: panels for name, panels in seen.items() if len(panels) > 1} == {
        "batch_size": {opt.OPTIMISER, opt.ESTIMATOR}
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_each_choice_is_known_to_shell_completion(command):
    cmd = typer.main.get_command(app).commands[command]
    ctx = cmd.make_context(command, ["run", "run"], resilient_parsing=True)
    completed = {p.name: tuple(c.value for c in p.shell_complete(ctx, "")) for p in cmd.params}
    assert {name: values for name, values in completed.items() if values} == CHOICES[command]


@pytest.mark.parametrize("command", ["sharpness", "compare"])
def test_the_help_shows_the_choices(command):
    text = _help(command)
    for shown in SHORT:
        assert shown in text
    assert "lambda_max" in text and "relative_flatness" in text  # --measures names its choices


def test_the_train_help_shows_its_choices():
    text = _help("train")
    for shown in ["<sgd|adam|adamw>", "<constant|cosine|paper>", "<gadam|swa|", "<logreg|mlp|"]:
        assert shown in text


def test_the_demo_help_names_the_models():
    text = " ".join(_help("demo").split())
    assert "<digits|mnist|" in text and "logreg, mlp, cnn" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_an_example(command):
    assert re.search(rf"Example: flatcli {command} \S", _help(command))


def test_bash_completes_a_choice():
    env = {
        "_FLATCLI_COMPLETE": "complete_bash",
        "COMP_WORDS": "flatcli sharpness run --curvature ",
        "COMP_CWORD": "4",
    }
    result = runner.invoke(app, [], env=env, prog_name="flatcli")
    assert result.exit_code == 0 and result.stdout.split() == list(CURVATURE_NAMES)


def test_shell_completion_is_offered():
    text = _help()
    assert "--install-completion" in text and "--show-completion" in text


@pytest.mark.parametrize(
    "args, option, names",
    [
        (["sharpness", "run", "--curvature", "x"], "'--curvature'", CURVATURE_NAMES),
        (["sharpness", "run", "--bn-mode", "x"], "'--bn-mode'", BN_MODES),
        (["sharpness", "run", "--dtype", "float16"], "'--dtype'", DTYPE_NAMES),
        (["sharpness", "run", "--split", "val"], "'--split'", ("train", "test")),
        (["sharpness", "run", "--scale-layer", "x"], "'--scale-layer'", ("all", "last")),
        (["compare", "a", "b", "--curvature", "x"], "'--curvature'", CURVATURE_NAMES),
        (["rank-bound", "run", "--dataset", "x"], "'--dataset'", choices.DATASET_NAMES),
        (["demo", "--dataset", "x"], "'--dataset'", choices.DATASET_NAMES),
        (["train", "--schedule", "x"], "'--schedule'", ("constant", "cosine", "paper")),
    ],
)
def test_an_invalid_choice_is_one_line_naming_the_valid_ones(args, option, names):
    listed = ", ".join(repr(n) for n in names)
    one_line_error(invoke_main(*args), 2, f"Invalid value for {option}", f"is not one of {listed}.")


def test_the_format_names_are_table_the_renderers_and_json():
    from flatcli.report.formats import RENDERERS

    assert choices.FORMAT_NAMES == ("table", *RENDERERS, "json")


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_and_lists_show_no_type_in_the_help(command):
    text = _help(command)
    options = text[text.index("╭─ Options") :]  # Typer's own -h/--help and list arguments aside
    options = options[options.index("╰") :]
    assert "<bool>" not in options and "<list[" not in options


def test_the_name_tuples_are_the_registries_names():
    from flatcli.models.registry import model_names
    from flatcli.workflows.data import DATASETS, SPLITS
    from flatcli.workflows.training import OPTIMIZERS, SCHEDULES

    assert choices.DATASET_NAMES == tuple(DATASETS)
    assert choices.MODEL_NAMES == tuple(model_names())
    assert choices.OPTIMIZER_NAMES == tuple(OPTIMIZERS)
    assert choices.SCHEDULE_NAMES == tuple(SCHEDULES)
    assert choices.SPLIT_NAMES == tuple(SPLITS)
