"""``flatcli demo``: the DemoConfig handed to the demo workflow, what is printed, and the
refusal to run under torchrun.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatcli.cli.progress import ProgressDisplay
from flatcli.config import DemoConfig
from flatcli.report.tables import demo_report
from flatcli.report.text import demo_as_dict

from .fakes import DEMO, FULL_DEMO, RUNS_TABLE_ROWS
from .helpers import invoke, one_line_error, wide_console

CLAIMS = (
    "The paper's claims on digits (1 runs under runs/demo/digits; 12 s in all)\n"
    "outcome        model    claim                        evidence          \n"
    "───────────────────────────────────────────────────────────────────────\n"
    "held           logreg   L2 makes the model sharper   4 vs 2            \n"
    "inconclusive   logreg   a tie                        [within] the noise\n"
)
WHERE_THE_DETAILS_ARE = (
    "Details (runs, verdict matrices, rank tables, sweep): add --verbose, or --json for all.\n"
)


DETAILS = (
    "logreg: L2 regularisation                                            \n"
    + RUNS_TABLE_ROWS
    + "verdicts                       \n"
    "             Δ acc.            \n"
    "pair       (points)  lambda_max\n"
    "───────────────────────────────\n"
    "sgd-l2 vs    +10.00        2x ✗\n"
    "sgd                     sharper\n"
    "b vs a: b is Nx sharper or flatter than a; Δ acc. = b's test accuracy - a's. ✓ flatness agrees (the \n"
    "sharper run generalises worse), ✗ disagrees, ~ accuracies tie; n.c. not converged.\n"
    "logreg: layers counted by the bound                    \n"
    "┏━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━━━━━━━━┓\n"
    "┃ layer ┃ kind   ┃ fan-in ┃ neurons ┃ (C-1)(fan-in+1) ┃\n"
    "┡━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━━━━━━━━┩\n"
    "│ fc    │ linear │      4 │       3 │              10 │\n"
    "└───────┴────────┴────────┴─────────┴─────────────────┘\n"
    "logreg: rank                                                             \n"
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
    "Rank bound (C-1) * sum(fan_in+1) = 2 x 5 = 10 (66.7% of P = 15); data bound N(C-1) = 20; smallest \n"
    "bound 10 (66.7% of P). Exact (dense float64, |lambda| > 1e-12 max|lambda|): Hessian rank 8 (53.3% of\n"
    "P), GGN rank 8; effective Hessian rank: 6 above 0.01 lambda_max (within the bound). Linear model: \n"
    "the bound is exact and the measured ranks obey it (8 <= 10).\n"
    "weights of all layers multiplied by a       \n"
    "┏━━━┳━━━━━━━┳━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━━━┓\n"
    "┃ a ┃ ||w|| ┃ loss ┃ accuracy ┃ lambda_max ┃\n"
    "┡━━━╇━━━━━━━╇━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━━━┩\n"
    "│ 1 │     2 │  0.5 │   90.00% │          1 │\n"
    "│ 2 │     4 │ 0.25 │   90.00% │        0.5 │\n"
    "└───┴───────┴──────┴──────────┴────────────┘\n"
)


DEMO_REPORT = CLAIMS + WHERE_THE_DETAILS_ARE
VERBOSE_REPORT = CLAIMS + DETAILS


@pytest.fixture
def demo(spy):
    return spy("flatcli.workflows.demo", "run_demo", DEMO)


def test_no_options_run_the_default_demo_in_a_folder_per_data_set(demo):
    result = invoke("demo")
    assert result.exit_code == 0, result.stderr
    (config,), kwargs = demo.one
    assert config == DemoConfig(out=Path("runs/demo/digits"))
    assert callable(kwargs.pop("on_step")) and isinstance(kwargs.pop("progress"), ProgressDisplay)
    assert kwargs == {}


def test_every_option_reaches_the_config(demo):
    args = ("-d", "mnist", "--data-dir", "d", "--models", "mlp, cnn", "--epochs", 5)
    more = ("--train-samples", 100, "--samples", 50, "--out", "o", "--overwrite", "--seed", 2)
    result = invoke("demo", *args, *more, "--device", "cpu", "--seeds", 3)
    assert result.exit_code == 0, result.stderr
    (config,), _ = demo.one
    assert config == DemoConfig(
        dataset="mnist",
        data_dir="d",
        models=("mlp", "cnn"),
        epochs=5,
        train_samples=100,
        measure_samples=50,
        out=Path("o"),
        seed=2,
        seeds=3,
        device="cpu",
        overwrite=True,
    )


def test_seeds_below_one_are_one_line_and_run_nothing(demo):
    one_line_error(invoke("demo", "--seeds", 0), 2, "--seeds must be a positive integer, got 0")
    assert demo.calls == []


def test_runs_demo_gets_a_folder_per_data_set_whether_given_or_not(demo):
    assert invoke("demo", "-d", "mnist").exit_code == 0
    assert invoke("demo", "-d", "mnist", "--out", "runs/demo").exit_code == 0
    assert [call[0][0].out for call in demo.calls] == [Path("runs/demo/mnist")] * 2


def test_json_is_the_demo_document(demo):
    result = invoke("demo", "--json")
    assert result.exit_code == 0, result.stderr
    doc, expected = json.loads(result.stdout), json.loads(json.dumps(demo_as_dict(DEMO)))
    assert list(doc)[-1] == "provenance"
    del doc["provenance"], expected["provenance"]  # its time and command line are this call's
    assert doc == expected


def test_the_claims_then_where_the_details_are(demo, screen):
    console = screen("flatcli.cli.demo")
    assert invoke("demo").exit_code == 0
    assert console.export_text() == DEMO_REPORT


def test_verbose_prints_the_claims_then_the_details(demo, screen):
    console = screen("flatcli.cli.demo")
    assert invoke("demo", "--verbose").exit_code == 0
    assert console.export_text() == VERBOSE_REPORT


def test_the_demo_report_at_100_columns():
    console = wide_console()
    demo_report(console, DEMO)
    assert console.export_text() == DEMO_REPORT
    demo_report(console, DEMO, verbose=True)
    assert console.export_text() == VERBOSE_REPORT


def test_a_full_demo_shows_its_claims_first_in_under_60_lines():
    console = wide_console()
    demo_report(console, FULL_DEMO)
    lines = console.export_text().splitlines()
    assert lines[0].startswith("The paper's claims on digits (9 runs under runs/demo/digits")
    assert lines[-1] == WHERE_THE_DETAILS_ARE.strip()
    assert len(lines) <= 60
    assert max(len(line) for line in lines) <= 100 and "…" not in "".join(lines)
    outcomes = [line.split()[0] for line in lines[3:-1] if line[:1].strip()]
    assert outcomes == ["held"] * len(FULL_DEMO.claims) == ["held"] * 10  # a row per claim
    column = lines[1].index("evidence")
    evidence = " ".join(line[column:].strip() for line in lines[3:-1])  # the evidence column
    assert evidence.startswith("sgd-l2 sharper, generalises better; lambda_max 2 -> 4")
    assert "held:" not in evidence  # the outcome column says it once
    demo_report(console, FULL_DEMO, verbose=True)
    verbose = console.export_text().splitlines()
    assert verbose[: len(lines) - 1] == lines[:-1]  # the same claims first, then the details
    assert len(verbose) > 3 * len(lines)
    assert sum(line.startswith("verdicts") for line in verbose) == len(FULL_DEMO.comparisons)


def test_under_torchrun_the_demo_is_refused(demo, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(invoke("demo"), 2, "flatcli demo runs in one process, not under torchrun")
    assert demo.calls == []
