"""``flatcli rank-bound``: the options handed to the rank workflow, what is printed, and
bad options refused before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatcli.cli.progress import ProgressDisplay
from flatcli.report.tables import rank_table
from flatcli.report.text import rank_as_dict, rank_statement
from flatcli.workflows.source import CheckpointSource

from .fakes import ESTIMATED_RANK, EXACT_RANK
from .helpers import invoke, one_line_error, rendered

EXACT_RANK_TABLES = (
    "layers counted by the bound                            \n"
    "┏━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━━━━━━━━┓\n"
    "┃ layer ┃ kind   ┃ fan-in ┃ neurons ┃ (C-1)(fan-in+1) ┃\n"
    "┡━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━━━━━━━━┩\n"
    "│ fc    │ linear │      4 │       3 │              10 │\n"
    "└───────┴────────┴────────┴─────────┴─────────────────┘\n"
    "rank                                                                     \n"
    "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━━━━━┓\n"
    "┃ quantity                                      ┃ value ┃ fraction of P ┃\n"
    "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━━┩\n"
    "│ parameters P                                  │    15 │       100.00% │\n"
    "│ paper bound (C-1) sum(fan-in+1)               │    10 │        66.67% │\n"
    "│ data bound N(C-1)                             │    20 │       133.33% │\n"
    "│ Hessian numerical rank (|lambda| > 1e-12 max) │     8 │        53.33% │\n"
    "│ GGN numerical rank                            │     8 │        53.33% │\n"
    "│ effective rank (|lambda| > 0.01 lambda_max)   │     6 │        40.00% │\n"
    "└───────────────────────────────────────────────┴───────┴───────────────┘\n"
)

ESTIMATED_RANK_TABLE = (
    "rank                                                                                 \n"
    "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━━━━━┓\n"
    "┃ quantity                                                  ┃ value ┃ fraction of P ┃\n"
    "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━━┩\n"
    "│ parameters P                                              │    15 │       100.00% │\n"
    "│ paper bound (C-1) sum(fan-in+1)                           │    10 │        66.67% │\n"
    "│ data bound N(C-1)                                         │    20 │       133.33% │\n"
    "│ effective rank, SLQ estimate (|lambda| > 0.01 lambda_max) │ 7 ± 1 │        49.33% │\n"
    "└───────────────────────────────────────────────────────────┴───────┴───────────────┘\n"
)


@pytest.fixture
def ranked(spy):
    return spy("flatcli.workflows.rank", "rank_checkpoint", EXACT_RANK)


def test_no_options_rank_the_checkpoint_with_the_defaults(ranked):
    result = invoke("rank-bound", "run")
    assert result.exit_code == 0, result.stderr
    assert isinstance(ranked.one[1].pop("progress"), ProgressDisplay)
    assert ranked.one == (
        (Path("run"), CheckpointSource(factory_args={})),
        {
            "samples": None,
            "exact": None,
            "threshold": None,
            "fraction": 0.01,
            "seed": 0,
        },
    )


def test_every_option_reaches_the_workflow(ranked):
    result = invoke(
        "rank-bound",
        "run",
        *("--threshold", 1e-6, "--estimate", "--fraction", 0.1, "--samples", 50, "--seed", 3),
        *("--device", "cpu", "--data-dir", "d", "-d", "mnist", "--model-factory", "m:f"),
        *("--factory-arg", "num_classes=3", "--output", "0"),
    )
    assert result.exit_code == 0, result.stderr
    assert isinstance(ranked.one[1].pop("progress"), ProgressDisplay)
    assert ranked.one == (
        (
            Path("run"),
            CheckpointSource(
                dataset="mnist",
                data_dir="d",
                device="cpu",
                model_factory="m:f",
                factory_args={"num_classes": 3},
                output="0",
            ),
        ),
        {
            "samples": 50,
            "exact": False,
            "threshold": 1e-6,
            "fraction": 0.1,
            "seed": 3,
        },
    )
    assert invoke("rank-bound", "run", "--exact").exit_code == 0
    assert ranked.calls[-1][1]["exact"] is True


def test_json_is_the_report_with_its_statement(ranked):
    result = invoke("rank-bound", "run", "--json")
    assert result.exit_code == 0, result.stderr
    doc, expected = json.loads(result.stdout), json.loads(json.dumps(rank_as_dict(EXACT_RANK)))
    assert doc.pop("provenance")["device"] == "cpu"  # resolved, never "auto"
    del expected["provenance"]  # its time and command line are this call's
    assert doc == expected
    assert doc["statement"] == rank_statement(EXACT_RANK.bound, EXACT_RANK.measured, True)


def test_the_tables_then_the_statement_are_printed(ranked, screen):
    console = screen("flatcli.cli.rank_bound")
    assert invoke("rank-bound", "run").exit_code == 0
    statement = rank_statement(EXACT_RANK.bound, EXACT_RANK.measured, EXACT_RANK.is_linear)
    assert console.export_text() == EXACT_RANK_TABLES + rendered(statement)


def test_the_rank_tables_at_100_columns():
    assert rendered(*rank_table(EXACT_RANK)) == EXACT_RANK_TABLES
    assert rendered(rank_table(ESTIMATED_RANK)[1]) == ESTIMATED_RANK_TABLE


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "1"], "threshold must lie in [0, 1)"),
        (["--fraction", "0"], "fraction must lie in (0, 1)"),
        (["--samples", "0"], "samples must be positive, got 0"),
        (["--factory-arg", "x"], "--factory-arg 'x' is not KEY=VALUE"),
    ],
)
def test_bad_options_are_one_line_and_load_nothing(spy, args, message):
    loaded = spy("flatcli.workflows.rank", "load_point")
    one_line_error(invoke("rank-bound", "run", *args), 2, message)
    assert loaded.calls == []
