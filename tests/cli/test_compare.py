"""``flatcli compare``: the runs and SharpnessConfig handed to the compare workflow,
what is printed, and bad options refused before anything is measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatcli.config import DEFAULT_COMPARE_MEASURES, SharpnessConfig
from flatcli.report.tables import comparison_table
from flatcli.workflows.compare import comparison_as_dict
from flatcli.workflows.source import CheckpointSource

from .fakes import COMPARISON
from .helpers import invoke, one_line_error, rendered

COMPARISON_TABLE = (
    "runs compared (ratio to the first run in brackets)                   \n"
    "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┓\n"
    "┃                             ┃              sgd ┃           sgd-l2 ┃\n"
    "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━┩\n"
    "│ optimiser                   │              sgd │              sgd │\n"
    "│ l2 (coupled)                │                0 │           0.0005 │\n"
    "│ weight decay (decoupled)    │                0 │                0 │\n"
    "│ averaging from epoch        │                - │                - │\n"
    "│ train loss                  │              0.1 │              0.1 │\n"
    "│ test loss                   │      0.3 (1.00x) │      0.2 (0.67x) │\n"
    "│ test accuracy               │           80.00% │           90.00% │\n"
    "│ generalisation gap (points) │            20.00 │            10.00 │\n"
    "│ ||w||                       │        4 (1.00x) │        2 (0.50x) │\n"
    "│ lambda_max                  │ 2 ± 0.01 (1.00x) │ 4 ± 0.01 (2.00x) │\n"
    "└─────────────────────────────┴──────────────────┴──────────────────┘\n"
)


@pytest.fixture
def compared(spy):
    return spy("flatcli.workflows.compare", "compare_checkpoints", COMPARISON)


def test_no_options_compare_the_runs_on_the_default_measures(compared):
    result = invoke("compare", "a", "b")
    assert result.exit_code == 0, result.stderr
    args, kwargs = compared.one
    assert args == (
        [Path("a"), Path("b")],
        SharpnessConfig(measures=DEFAULT_COMPARE_MEASURES),
        CheckpointSource(factory_args={}),
    )
    assert callable(kwargs.pop("progress"))
    assert kwargs == {"use_cache": True, "tie_sigmas": 2.0}


def test_every_option_reaches_the_workflow(compared):
    result = invoke(
        "compare",
        *("a", "b", "c"),
        *("--measures", "trace,lambda_max", "--split", "test", "--samples", 100),
        *("--batch-size", 50, "--memory-gb", 1, "--curvature", "ggn", "--bn-mode", "full"),
        *("--include-l2", "--exact", "--tol", 1e-3, "--max-iter", 30, "--probes", 20),
        *("--rho", 0.1, "--logit-normalise", "--tie-sigmas", 3, "--seed", 4),
        *("--dtype", "float64", "--device", "cpu", "--data-dir", "d", "-d", "mnist"),
        *("--model-factory", "m:f", "--factory-arg", "k=[1, 2]", "--output", "out", "--no-cache"),
    )
    assert result.exit_code == 0, result.stderr
    args, kwargs = compared.one
    assert args == (
        [Path("a"), Path("b"), Path("c")],
        SharpnessConfig(
            measures=("trace", "lambda_max"),
            split="test",
            samples=100,
            batch_size=50,
            memory_gb=1.0,
            curvature="ggn",
            bn_mode="full",
            include_l2=True,
            exact=True,
            tol=1e-3,
            max_iter=30,
            probes=20,
            rho=0.1,
            logit_normalise=True,
            seed=4,
            dtype="float64",
        ),
        CheckpointSource(
            dataset="mnist",
            data_dir="d",
            device="cpu",
            model_factory="m:f",
            factory_args={"k": [1, 2]},
            output="out",
        ),
    )
    kwargs.pop("progress")
    assert kwargs == {"use_cache": False, "tie_sigmas": 3.0}


def test_json_is_the_comparison_document(compared):
    result = invoke("compare", "a", "b", "--json")
    assert result.exit_code == 0, result.stderr
    doc, expected = (
        json.loads(result.stdout),
        json.loads(json.dumps(comparison_as_dict(COMPARISON))),
    )
    assert doc.pop("provenance")["device"] == "cpu"  # resolved, never "auto"
    del expected["provenance"]  # its time and command line are this call's
    assert doc == expected


def test_the_table_then_one_line_per_verdict(compared, screen):
    console = screen("flatcli.cli.compare")
    assert invoke("compare", "a", "b").exit_code == 0
    (verdict,) = COMPARISON.verdicts
    assert console.export_text() == COMPARISON_TABLE + rendered(f"- {verdict.text}")


def test_the_comparison_table_at_100_columns():
    assert rendered(comparison_table(COMPARISON)) == COMPARISON_TABLE


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["a"], 2, "compare needs at least two runs"),
        (["a", "b", "--measures", "nope"], 2, "unknown measure nope"),
        (["a", "b", "--probes", "2"], 2, "probes must be at least 4"),
        (["a", "b", "--factory-arg", "=1"], 2, "--factory-arg '=1' is not KEY=VALUE"),
    ],
)
def test_bad_options_are_one_line_and_compare_nothing(compared, args, code, message):
    one_line_error(invoke("compare", *args), code, message)
    assert compared.calls == []
