"""``flatcli demo --protocol paper``: the paper's recipes, the plan, the published numbers,
and the protocol end to end on a tiny CIFAR-shaped data set in torchvision's layout.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from cli.helpers import invoke, invoke_main, one_line_error  # tests/cli/helpers.py

from flatcli.analysis.paper import PUBLISHED, RATIOS, published_ratio, published_run
from flatcli.cli import choices
from flatcli.config import RECIPES, make_train_config
from flatcli.report.schema import JSON_SCHEMA
from flatcli.workflows import demo as demo_workflow
from flatcli.workflows import protocol
from flatcli.workflows.checkpoint import MODEL_FILE, STATE_FILE
from flatcli.workflows.data import load_dataset
from flatcli.workflows.protocol import (
    ARMS,
    OVERRIDES,
    PROTOCOL_MODELS,
    RECIPE_SOURCES,
    ProtocolConfig,
    ProtocolModel,
    estimate_plan,
    plan_protocol,
)
from flatcli.workflows.training import TrainCallbacks, read_history, train

README = Path(__file__).resolve().parents[1] / "README.md"
OPTIMISERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
#: The estimators' settings of the end-to-end runs: a few products each.
TINY = ("--max-iter", 4, "--probes", 4, "--density-iterations", 4)


def readme_table(first_header: str) -> list[dict[str, str]]:
    """The rows of the README table of "Reproducing the paper" whose first header is ``first_header``."""
    section = README.read_text().split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def number(cell: str) -> float | None:
    return None if cell in ("—", "") else float(cell)


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def dry_run_plan(tmp_path: Path, *args: object) -> dict:
    result = invoke("demo", "--protocol", "paper", "--dry-run", "--no-estimate", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# --- the recipes ----------------------------------------------------------------------


def test_every_arm_is_a_recipe_with_a_source_and_the_cli_knows_the_names():
    assert set(ARMS.values()) <= set(RECIPES) and set(ARMS.values()) == set(RECIPE_SOURCES)
    assert choices.ARM_NAMES == tuple(ARMS)
    assert choices.PROTOCOL_MODEL_NAMES == tuple(PROTOCOL_MODELS)
    assert set(choices.RECIPE_NAMES) == set(RECIPES)


def test_paper_recipes_average_from_epoch_161_of_300_and_decay_to_the_averaging_lr():
    gadam = make_train_config("paper-gadam", dataset="cifar100", model="vgg16")
    assert (gadam.optimizer, gadam.lr, gadam.weight_decay, gadam.l2) == ("adamw", 5e-4, 0.25, 0.0)
    assert (gadam.epochs, gadam.batch_size, gadam.schedule) == (300, 128, "paper")
    assert gadam.average_from == 161 and gadam.final_lr == pytest.approx(2.5e-4)
    sgd = make_train_config("paper-sgd")
    assert (sgd.average_from, sgd.final_lr, sgd.momentum) == (None, pytest.approx(1e-3), 0.9)
    # an explicit option wins, and the averaging start follows the epochs given
    short = make_train_config("paper-swa", epochs=30, lr=0.2)
    assert (short.epochs, short.average_from, short.final_lr) == (30, 17, pytest.approx(0.1))


def test_the_short_recipes_are_unchanged():
    assert make_train_config("gadam").average_from == 11  # 0.53 of the default 20 epochs
    assert make_train_config("swa", epochs=300).average_from == 160


# --- the plan -------------------------------------------------------------------------


def test_the_plan_has_one_run_per_model_and_arm(tmp_path):
    plan = plan_protocol(ProtocolConfig(models=("vgg16", "wrn"), arms=("sgd", "gadam", "swa")))
    assert [r.name for r in plan.runs] == [
        f"{m}-{a}" for m in ("vgg16", "wrn") for a in ("sgd", "gadam", "swa")
    ]
    assert {r.status for r in plan.runs} == {"new"}
    assert len(plan_protocol(ProtocolConfig()).runs) == len(PROTOCOL_MODELS) * len(ARMS)


def test_dry_run_prints_the_readme_recipes_and_epochs_for_each_model(tmp_path):
    recipes = {names(r["recipe"])[0]: r for r in readme_table("recipe")}
    overrides = {
        (names(r["model"])[0], arm): r for r in readme_table("model") for arm in names(r["arm"])
    }
    assert set(recipes) == set(ARMS.values())
    assert set(overrides) == set(OVERRIDES)
    document = dry_run_plan(tmp_path, "-d", "cifar100", "--out", tmp_path / "paper")
    assert len(document["runs"]) == len(PROTOCOL_MODELS) * len(ARMS)
    for run in document["runs"]:
        train = run["train"]
        row = recipes[train["recipe"]]
        assert train["recipe"] == ARMS[run["arm"]]
        assert train["optimizer"] == OPTIMISERS[row["optimiser"].split(",")[0].split()[0]]
        assert train["epochs"] == int(row["epochs"]) == 300
        assert train["average_from"] == number(row["averaging from"])
        assert train["l2"] == number(row["L2"])
        assert (train["batch_size"], train["schedule"]) == (128, "paper")
        lr, wd = number(row["lr"]), number(row["wd"])
        override = overrides.get((run["model"], run["arm"]))
        if override is not None:
            lr = number(override["lr"])
            wd = number(override["wd"]) if override["wd"] else wd
        assert (train["lr"], train["weight_decay"]) == (lr, wd), run["run"]
        final = (
            number(row["final lr"])
            if override is None
            else train["lr"] * (0.5 if train["average_from"] else 0.01)
        )
        assert train["lr_final"] == pytest.approx(final), run["run"]
    # the table says the same, with each model's runs
    text = invoke("demo", "--protocol", "paper", "--dry-run", "--no-estimate", "-d", "cifar10")
    assert text.exit_code == 0, text.stderr
    assert "The paper's protocol on cifar10: 24 runs (4 models x 6 arms)" in text.stdout
    assert re.search(
        r"preresnet-gadam\*\s+paper-gadam\s+0\.001\s+0\s+0\.1\s+300\s+161", text.stdout
    )
    assert re.search(r"wrn-swa\s+paper-swa\s+0\.1\s+0\.0005\s+0\s+300\s+161", text.stdout)


def test_epochs_and_samples_override_the_recipes_and_the_plan_says_so(tmp_path):
    document = dry_run_plan(
        tmp_path, "--models", "vgg16-bn", "--arms", "gadam", "--epochs", 10, "--samples", 64
    )
    (run,) = document["runs"]
    assert (run["train"]["epochs"], run["train"]["average_from"]) == (10, 6)
    assert document["measure_samples"] == 64
    text = invoke("demo", "--protocol", "paper", "--dry-run", "--no-estimate", "--epochs", 10)
    assert "overridden: the paper uses every sample for 300 epochs" in text.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--protocol", "papers"], ["'papers' is not one of 'demo', 'paper'"]),
        (["--protocol", "paper", "--models", "vgg16,mlp"], ["unknown protocol model 'mlp'"]),
        (["--protocol", "paper", "--arms", "sgd,sam"], ["unknown protocol arm 'sam'"]),
        (["--dry-run"], ["--dry-run only applies to the paper's protocol", "--protocol paper"]),
        (["--arms", "sgd"], ["--arms only applies to the paper's protocol"]),
        (["--protocol", "paper", "--probes", "3"], ["probes must be at least 4"]),
    ],
)
def test_bad_protocol_options_are_one_line_and_exit_2(args, fragments):
    one_line_error(invoke_main("demo", *args, "--dry-run"), 2, *fragments)


def test_the_estimate_times_each_model_once_and_adds_up(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setattr(protocol, "WARMUP_STEPS", 1)
    config = ProtocolConfig(
        dataset="digits", models=("vgg16-bn",), arms=("sgd", "gadam"), epochs=2, device="cpu"
    )
    plan = estimate_plan(plan_protocol(config))
    (estimate,) = plan.estimates.values()
    assert estimate.batch_s > 0 and estimate.hvp_s > 0 and estimate.measure_s > 0
    per_run = [plan.seconds(r) for r in plan.runs]
    assert per_run == [2 * estimate.epoch_s + estimate.measure_s] * 2
    assert plan.total_seconds == pytest.approx(sum(per_run))


# --- the published numbers ------------------------------------------------------------


def test_the_quoted_ratios_agree_with_the_published_table():
    (table,) = PUBLISHED
    for ratio in RATIOS:
        for model in ratio.models:
            runs = [
                published_run(ratio.dataset, model, arm)
                for arm in (ratio.numerator, ratio.denominator)
            ]
            if None in runs:  # a claim's ratio, not one of the table's
                continue
            a, b = runs
            assert a.lambda_max / b.lambda_max == pytest.approx(ratio.quoted, rel=0.03)
    assert published_run("cifar100", "preresnet", "sgd").lambda_max == 3.77
    assert published_run("cifar10", "preresnet", "sgd") is None
    assert published_ratio(RATIOS[0], "cifar100", "vgg16") is None


# --- end to end on a synthetic CIFAR --------------------------------------------------


def write_cifar(root: Path, classes: int, train: int = 64, test: int = 32) -> None:
    """A tiny data set in torchvision's layout: cifar-10-batches-py (five data batches,
    a test batch, batches.meta) or cifar-100-python (train, test, meta), pickled dicts of
    uint8 rows of 3 x 32 x 32 and labels.
    """
    rng = np.random.default_rng(0)

    def batch(n: int, key: str) -> dict:
        return {
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            key: rng.integers(0, classes, n).tolist(),
        }

    def dump(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj))

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", batch(train // 5 + (i <= train % 5), "labels"))
        dump(folder / "test_batch", batch(test, "labels"))
        dump(folder / "batches.meta", {"label_names": [str(c) for c in range(10)]})
    else:
        folder = root / "cifar-100-python"
        dump(folder / "train", batch(train, "fine_labels"))
        dump(folder / "test", batch(test, "fine_labels"))
        dump(folder / "meta", {"fine_label_names": [str(c) for c in range(classes)]})


@pytest.fixture
def synthetic_cifar(tmp_path, monkeypatch):
    """A data folder holding both tiny sets. torchvision checks each file's md5 against the
    real CIFAR's (flatcli's loader calls torchvision as it is): the check is replaced by
    one that the files exist.
    """
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )
    root = tmp_path / "cifar"
    write_cifar(root, 10)
    write_cifar(root, 100)
    return root


@pytest.fixture
def tiny_models(monkeypatch):
    """The protocol's VGG-16 with BatchNorm at 1/16 of its width (fast on a CPU)."""
    monkeypatch.setitem(
        PROTOCOL_MODELS,
        "vgg16-bn",
        ProtocolModel("vgg16", {"batchnorm": True, "width_factor": 0.0625}, "VGG-16/16"),
    )


def protocol_run(data: Path, out: Path, *args: object, samples: int = 16):
    return invoke(
        "demo",
        "--protocol",
        "paper",
        "--data-dir",
        data,
        "--out",
        out,
        "--epochs",
        1,
        "--samples",
        samples,
        "--device",
        "cpu",
        *TINY,
        *args,
    )


def test_protocol_runs_end_to_end_on_cifar_files_and_a_rerun_trains_nothing(
    tmp_path, synthetic_cifar, tiny_models, monkeypatch
):
    out = tmp_path / "paper"
    args = ("-d", "cifar10", "--models", "vgg16-bn", "--arms", "sgd", "--no-estimate")
    first = protocol_run(synthetic_cifar, out, *args)
    assert first.exit_code == 0, first.stderr
    assert "flatcli beside the paper on cifar10" in first.stdout
    assert re.search(r"vgg16-bn-sgd\s+│(\s+[0-9.e+-]+\s+│\s+—\s+│){3}\s+[0-9.]+%", first.stdout)
    assert (out / "vgg16-bn-sgd" / MODEL_FILE).is_file()
    assert (out / "figures" / "vgg16-bn-sgd-density.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(protocol, "train", no_training)
    monkeypatch.setattr(demo_workflow, "train", no_training)
    second = protocol_run(synthetic_cifar, out, *args, "--json", "--no-plots")
    assert second.exit_code == 0, second.stderr
    document = json.loads(second.stdout)
    assert list(jsonschema.Draft202012Validator(JSON_SCHEMA).iter_errors(document)) == []
    assert [r["status"] for r in document["plan"]["runs"]] == ["finished"]
    (run,) = document["runs"]
    assert run["run"] == "vgg16-bn-sgd" and run["paper"] is None  # no published CIFAR-10 numbers


@pytest.mark.slow
def test_protocol_on_cifar100_files_prints_the_ratios_the_paper_quotes(
    tmp_path, synthetic_cifar, tiny_models
):
    out = tmp_path / "paper"
    result = protocol_run(
        synthetic_cifar,
        out,
        "-d",
        "cifar100",
        "--models",
        "vgg16-bn",
        "--arms",
        "sgd,gadam",
        samples=64,
    )
    assert result.exit_code == 0, result.stderr
    assert "estimated" in result.stdout  # the plan, timed, before the results
    assert re.search(
        r"Gadam vs SGD\s+│\s+gadam / sgd\s+│\s+vgg16-bn\s+│\s+[0-9.]+x\s+│\s+30x", result.stdout
    )
    for run in ("vgg16-bn-sgd", "vgg16-bn-gadam"):
        assert (out / "figures" / f"{run}-density.png").stat().st_size > 0


def test_a_stopped_run_continues_where_it_stopped(tmp_path, synthetic_cifar, tiny_models):
    config = ProtocolConfig(
        dataset="cifar100",
        data_dir=str(synthetic_cifar),
        models=("vgg16-bn",),
        arms=("sgd",),
        epochs=2,
        samples=16,
        max_iter=4,
        probes=4,
        density_iterations=4,
        out=tmp_path / "paper",
        device="cpu",
        estimate=False,
    )
    (planned,) = plan_protocol(config).runs

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped after its first epoch
        train(planned.config, TrainCallbacks(on_epoch=stop))
    assert (planned.out / STATE_FILE).is_file()
    (stopped,) = plan_protocol(config).runs
    assert (stopped.status, stopped.done) == ("stopped", 1)
    result = protocol.run_protocol(plan_protocol(config))
    assert [r.epoch for r in read_history(planned.out).records] == [1, 2]
    (row,) = result.rows
    assert row.test_accuracy is not None and row.lambda_max.value > 0
    assert row.published is None  # the paper publishes PreResNet-110's numbers only


@pytest.mark.slow
def test_protocol_end_to_end_with_the_real_models(tmp_path, synthetic_cifar):
    """VGG-16 and PreResNet-110 at full size, one epoch on 64 CIFAR-100-shaped images."""
    out = tmp_path / "paper"
    result = protocol_run(
        synthetic_cifar,
        out,
        "-d",
        "cifar100",
        "--models",
        "vgg16,preresnet",
        "--arms",
        "sgd",
        "--memory-gb",
        8,
        "--max-iter",
        3,
        "--probes",
        4,
        "--density-iterations",
        3,
        samples=64,
    )
    assert result.exit_code == 0, result.stderr
    assert re.search(r"preresnet-sgd\s+│.*│\s+3\.77\s+│", result.stdout)
    assert "estimated" in result.stdout


def test_the_split_sizes_the_estimate_scales_to_are_the_loaders():
    train, test = (len(load_dataset("digits", split)) for split in ("train", "test"))
    assert protocol.SPLIT_SIZES["digits"] == (train, test)
    plan = plan_protocol(ProtocolConfig(dataset="digits", models=("vgg16",), train_samples=100))
    assert (plan.train_size, plan.measure_size, plan.test_size) == (100, 100, test)
    assert plan.config.sharpness().samples == 100  # measured on the samples it trained on
