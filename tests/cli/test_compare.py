"""``flatcli compare``: the runs and SharpnessConfig handed to the compare workflow,
what is printed, and bad options refused before anything is measured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flatcli.analysis.verdicts import compare
from flatcli.config import DEFAULT_COMPARE_MEASURES, SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.report.tables import comparison_table, verdict_legend, verdict_matrix
from flatcli.report.text import compare_as_dict
from flatcli.workflows.source import CheckpointSource

from .fakes import COMPARISON, RUNS_TABLE_ROWS, WIDE_COMPARISON, run
from .helpers import invoke, one_line_error, rendered

COMPARISON_TABLE = (
    "runs compared (ratio to the first run in brackets)                   \n" + RUNS_TABLE_ROWS
)

VERDICT_MATRIX = (
    "verdicts                       \n"
    "             Δ acc.            \n"
    "pair       (points)  lambda_max\n"
    "───────────────────────────────\n"
    "sgd-l2 vs    +10.00        2x ✗\n"
    "sgd                     sharper\n"
)

# every kind of cell: sharper and flatter, ✓ agrees, ✗ disagrees, ~ accuracy tie, a sharpness
# tie, n.c.; seven measures and a long run name in 100 columns, no word folded
WIDE_MATRIX = (
    "verdicts                                                                                           \n"
    "                     Δ acc.                                lambda_max    Tr(H)   adaptive  relative\n"
    "pair               (points)  lambda_max    Tr(H)  ||H||_F     ||w||^2  ||w||^2  sharpness  flatness\n"
    "───────────────────────────────────────────────────────────────────────────────────────────────────\n"
    "sgd-l2 vs             +3.00      2.4x ✗      tie     3x ✓        2x ✗   1.1x ✗       2x ✓     10x ✗\n"
    "sgd                             sharper           flatter     sharper  sharper    flatter   sharper\n"
    "                                                                                                   \n"
    "gadam-averaged vs     +0.20      1.2x ~     2x ~      tie         tie      tie        tie       tie\n"
    "sgd                     tie     sharper  sharper                                                   \n"
    "                                                                                                   \n"
    "x vs                 -10.00        n.c.     n.c.     n.c.        n.c.     n.c.       n.c.      n.c.\n"
    "sgd                                                                                                \n"
    "                                                                                                   \n"
    "gadam-averaged vs     -2.80        2x ✗     2x ✓  3.01x ✓        2x ✗   1.1x ✗       2x ✓     10x ✗\n"
    "sgd-l2                          flatter  sharper  sharper     flatter  flatter    sharper   flatter\n"
    "                                                                                                   \n"
    "x vs                 -13.00        n.c.     n.c.     n.c.        n.c.     n.c.       n.c.      n.c.\n"
    "sgd-l2                                                                                             \n"
    "                                                                                                   \n"
    "x vs                 -10.20        n.c.     n.c.     n.c.        n.c.     n.c.       n.c.      n.c.\n"
    "gadam-averaged                                                                                     \n"
)

#: The marks, then the noise the accuracy ties rest on.
LEGEND = verdict_legend(COMPARISON)


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
    assert kwargs == {"use_cache": True, "tie_sigmas": 2.0, "last_epochs": 5}


def test_every_option_reaches_the_workflow(compared):
    result = invoke(
        "compare",
        *("a", "b", "c"),
        *("--measures", "trace,lambda_max", "--split", "test", "--samples", 100),
        *("--batch-size", 50, "--memory-gb", 1, "--curvature", "ggn", "--bn-mode", "full"),
        *("--include-l2", "--exact", "--tol", 1e-3, "--max-iter", 30, "--probes", 20),
        *("--rho", 0.1, "--logit-normalise", "--tie-sigmas", 3, "--seed", 4, "--last-epochs", 8),
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
    assert kwargs == {"use_cache": False, "tie_sigmas": 3.0, "last_epochs": 8}


def test_json_is_the_comparison_document(compared):
    result = invoke("compare", "a", "b", "--json")
    assert result.exit_code == 0, result.stderr
    doc, expected = (
        json.loads(result.stdout),
        json.loads(json.dumps(compare_as_dict(COMPARISON))),
    )
    assert doc.pop("provenance")["device"] == "cpu"  # resolved, never "auto"
    del expected["provenance"]  # its time and command line are this call's
    assert doc == expected


def test_the_table_then_the_verdict_matrix_and_its_legend(compared, screen):
    console = screen("flatcli.cli.compare")
    assert invoke("compare", "a", "b").exit_code == 0
    assert console.export_text() == COMPARISON_TABLE + VERDICT_MATRIX + rendered(LEGEND)


def test_the_legend_says_which_accuracy_noise_the_ties_used():
    # the fakes are runs known by their final accuracy on 1,000 test samples
    assert LEGEND.endswith(
        "\naccuracy ties: |Δ acc.| within the noise, binomial s.e. of 1000 test samples "
        "(sgd, sgd-l2)"
    )
    assert verdict_legend(compare(COMPARISON.runs, tie_accuracy=0.5)).endswith(
        "\naccuracy ties: |Δ acc.| <= 0.5 points (a fixed threshold)"
    )


def test_commas_join_the_runs_of_one_arm(compared):
    result = invoke("compare", "a-s0,a-s1,a-s2", "b", "c-s0,c-s1")
    assert result.exit_code == 0, result.stderr
    (arms, _, _), _ = compared.one
    assert arms == [
        (Path("a-s0"), Path("a-s1"), Path("a-s2")),
        Path("b"),
        (Path("c-s0"), Path("c-s1")),
    ]


def test_a_run_whose_name_has_a_comma_is_one_run(compared):
    Path("x,y").mkdir()
    assert invoke("compare", "x,y", "b").exit_code == 0
    (arms, _, _), _ = compared.one
    assert arms == [Path("x,y"), Path("b")]


def test_an_empty_run_in_an_arm_is_one_line_and_compares_nothing(compared):
    one_line_error(invoke("compare", "a-s0,,a-s1", "b"), 2, "'a-s0,,a-s1' names an empty run")
    assert compared.calls == []


def test_explain_adds_the_sentence_behind_each_verdict(compared, screen):
    console = screen("flatcli.cli.compare")
    assert invoke("compare", "a", "b", "--explain").exit_code == 0
    (verdict,) = COMPARISON.verdicts
    text = console.export_text()
    assert text == COMPARISON_TABLE + VERDICT_MATRIX + rendered(LEGEND, f"- {verdict.text}")
    assert "- sgd-l2 is 2x sharper than sgd by lambda_max" in text


def test_the_comparison_table_at_100_columns():
    assert rendered(comparison_table(COMPARISON)) == COMPARISON_TABLE


def test_the_verdict_matrix_at_100_columns():
    assert rendered(verdict_matrix(COMPARISON)) == VERDICT_MATRIX
    assert rendered(verdict_matrix(WIDE_COMPARISON)) == WIDE_MATRIX


@pytest.mark.parametrize(
    "value, cell", [(1.0006, "1.001x ✗"), (1.00004, "1.00004x ✗"), (3, "3x ✗")]
)
def test_a_difference_beyond_the_tie_never_reads_1x(value, cell):
    def exact(value: float) -> dict[str, Estimate]:
        return {"lambda_max": Estimate(value=value, uncertainty=0.0, kind="exact")}

    runs = [run("a", 0.8, 1, measures=exact(1.0)), run("b", 0.9, 1, measures=exact(value))]
    assert f" {cell}\n" in rendered(verdict_matrix(compare(runs)))


def test_seven_measures_and_four_runs_fit_100_columns_uncut():
    text = rendered(comparison_table(WIDE_COMPARISON), verdict_matrix(WIDE_COMPARISON))
    text += rendered(verdict_legend(WIDE_COMPARISON))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text
    words = text.split()
    for label in ("lambda_max", "||H||_F", "||w||^2", "sharpness", "flatness", "gadam-averaged"):
        assert label in words, label
    # one row per pair (i < j), each a "b vs" over "a"
    matrix = rendered(verdict_matrix(WIDE_COMPARISON))
    assert len(re.findall(r"^[\w-]+ vs ", matrix, re.MULTILINE)) == 6
    assert len(WIDE_COMPARISON.verdicts) == 6 * 7


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
