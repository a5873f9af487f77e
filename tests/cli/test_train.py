"""``flatcli train``: the TrainConfig the options build, what is printed, and bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatcli import __version__
from flatcli.config import TrainConfig, make_train_config
from flatcli.report.schema import SCHEMA_VERSION
from flatcli.report.tables import metrics_table
from flatcli.workflows.training import TrainCallbacks, TrainResult

from .helpers import invoke, invoke_main, one_line_error, rendered

RESULT = TrainResult(
    run_dir=Path("runs/r"),
    checkpoint=Path("runs/r/model.safetensors"),
    metrics={"train_loss": 0.25, "test_accuracy": 0.875, "epochs": 3},
)


@pytest.fixture
def train(spy):
    return spy("flatcli.workflows.training", "train", RESULT)


def test_no_options_train_the_default_config(train):
    result = invoke("train")
    assert result.exit_code == 0, result.stderr
    (config, callbacks), kwargs = train.one
    assert config == TrainConfig() and kwargs == {}
    assert isinstance(callbacks, TrainCallbacks)


def every_option() -> tuple[list[object], TrainConfig]:
    """Every option of the command, and the config they make."""
    args = [
        *("--model", "mlp", "--width", 8, "--depth", 2, "--model-arg", "dropout=0.5"),
        *("--dataset", "mnist", "--optimizer", "adam", "--momentum", 0.5, "--epochs", 4),
        *("--batch-size", 32, "--l2", 1e-4, "--weight-decay", 0.01, "--schedule", "cosine"),
        *("--lr-final", 1e-5, "--average-from", 2, "--augment", "--sync-bn"),
        *("--train-samples", 100, "--seed", 5, "--data-dir", "d", "--download"),
        *("--device", "cpu", "--out", "r", "--overwrite"),
    ]
    expected = TrainConfig(
        dataset="mnist",
        model="mlp",
        model_kwargs={"dropout": 0.5, "width": 8, "depth": 2},
        optimizer="adam",
        lr=1e-3,
        momentum=0.5,
        epochs=4,
        batch_size=32,
        seed=5,
        l2=1e-4,
        weight_decay=0.01,
        schedule="cosine",
        lr_final=1e-5,
        average_from=2,
        augment=True,
        sync_bn=True,
        train_samples=100,
        data_dir="d",
        download=True,
        device="cpu",
        out=Path("r"),
        overwrite=True,
    )
    return args, expected


def test_options_build_the_exact_config(train):
    args, expected = every_option()
    result = invoke("train", *args)
    assert result.exit_code == 0, result.stderr
    (config, _), _ = train.one
    assert config == expected


def test_a_recipe_fills_what_is_not_given(train):
    assert invoke("train", "--recipe", "gadam", "--epochs", 10).exit_code == 0
    (config, _), _ = train.one
    assert config == make_train_config("gadam", epochs=10)
    assert config.optimizer == "adamw" and config.average_from == 6


def test_resume_continues_the_run_with_its_recorded_options(train, spy, tmp_path):
    stored = TrainConfig(epochs=5, lr=0.1, seed=3).recorded()
    read = spy("flatcli.workflows.run_folder", "read_run_options", stored)
    result = invoke("train", "--resume", "--out", "r", "--epochs", 7)
    assert result.exit_code == 0, result.stderr
    assert read.one == ((Path("r"),), {})
    (config, _), _ = train.one
    assert config == TrainConfig(epochs=7, lr=0.1, seed=3, out=Path("r"), resume=True)


def test_resume_refuses_an_option_that_contradicts_the_run(train, spy):
    spy("flatcli.workflows.run_folder", "read_run_options", TrainConfig(lr=0.1).recorded())
    result = invoke("train", "--resume", "--out", "r", "--lr", 0.5)
    one_line_error(result, 2, "--lr 0.5 contradicts the run's lr 0.1")
    assert train.calls == []


def test_json_is_the_metrics_and_where_the_run_is(train):
    result = invoke("train", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc.pop("provenance")["device"] == "cpu"  # of the training call, "auto" resolved
    assert doc == {
        "schema_version": SCHEMA_VERSION,
        "flatcli_version": __version__,
        "command": "train",
        "train_loss": 0.25,
        "test_accuracy": 0.875,
        "epochs": 3,
        "checkpoint": "runs/r/model.safetensors",
        "run_dir": "runs/r",
    }


def test_the_table_names_model_and_data(train, screen):
    console = screen("flatcli.cli.train")
    assert invoke("train", "--model", "mlp").exit_code == 0
    assert console.export_text() == rendered(
        metrics_table(
            "mlp on digits",
            {
                **RESULT.metrics,
                "checkpoint": str(RESULT.checkpoint),
                "run_dir": str(RESULT.run_dir),
            },
        )
    )


def test_the_metrics_table_at_100_columns():
    assert rendered(metrics_table("mlp on digits", {"train_loss": 0.123456, "epochs": 3})) == (
        "     mlp on digits     \n"
        "┏━━━━━━━━━━━━┳━━━━━━━━┓\n"
        "┃ metric     ┃  value ┃\n"
        "┡━━━━━━━━━━━━╇━━━━━━━━┩\n"
        "│ train loss │ 0.1235 │\n"
        "│ epochs     │      3 │\n"
        "└────────────┴────────┘\n"
    )


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model-arg", "width"], 2, "--model-arg 'width' is not KEY=VALUE"),
        (["--overwrite", "--resume"], 2, "--overwrite and --resume contradict each other"),
        (["--epochs", "0"], 2, "epochs must be positive"),
        (["--recipe", "adam"], 2, "'adam' is not one of 'gadam', 'swa'"),
    ],
)
def test_bad_options_are_one_line_and_train_nothing(train, args, code, message):
    one_line_error(invoke_main("train", *args), code, message)
    assert train.calls == []
