"""Comparing runs: ratios to the first run, and a verdict per pair and measure.

Specification:
- ratios[i][m] = run_i / run_0 for every shared measure, the weight norm and test loss;
- the sharper run generalising better means flatness *disagrees* (agrees=False);
  generalising worse means it agrees (agrees=True);
- a sharpness difference within tie_sigmas combined uncertainties, or an accuracy
  difference within the binomial standard error of the test accuracies (or a given
  threshold in points), is a tie: agrees=None and the text says "tie";
- n runs give a verdict for each of the n(n-1)/2 pairs and each shared measure;
- compare_checkpoints takes arms (a run, or the runs of several seeds of one setting),
  judges each run's mean test accuracy over its last epochs (an averaged run: its final
  accuracy) and refuses an arm whose runs differ in more than their seed
  (tests/test_seeds.py has the arithmetic of arms and noise).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flatcli import train
from flatcli.analysis.verdicts import (
    MEASURE_ORDER,
    RunSummary,
    Verdict,
    accuracy_threshold_points,
    compare,
    verdict,
)
from flatcli.cli import app
from flatcli.config import SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.errors import UsageError
from flatcli.workflows.compare import compare_checkpoints, comparison_as_dict

LAMBDA_MAX = SharpnessConfig(measures=("lambda_max",), samples=100)


def estimate(value, uncertainty=0.0, converged=True):
    return Estimate(value=value, uncertainty=uncertainty, kind="bound", converged=converged)


def run(name, test_accuracy, measures, *, weight_norm=10.0, test_loss=1.0, test_size=10_000, **kw):
    base = dict(
        optimizer="sgd",
        l2=0.0,
        weight_decay=0.0,
        averaging=None,
        train_loss=0.01,
        train_accuracy=1.0,
    )
    base.update(kw)
    return RunSummary(
        name=name,
        test_accuracy=test_accuracy,
        weight_norm=weight_norm,
        test_loss=test_loss,
        measures={k: estimate(*v) for k, v in measures.items()},
        test_size=test_size,
        **base,
    )


# The PreResNet-110 / CIFAR-100 numbers of Granziol 2020 (accuracies illustrative).
SGD_WD = dict(
    name="sgd-wd", test_accuracy=0.77, measures={"lambda_max": (30.4, 0.1)}, weight_norm=45.5
)
SGD = dict(name="sgd", test_accuracy=0.75, measures={"lambda_max": (3.77, 0.05)}, weight_norm=307.0)


def test_ratios_are_relative_to_the_first_run():
    a = run(**SGD_WD, test_loss=0.9)
    b = run(**SGD, test_loss=1.2)
    result = compare([a, b])
    assert result.ratios[0] == {"lambda_max": 1.0, "weight_norm": 1.0, "test_loss": 1.0}
    assert result.ratios[1]["lambda_max"] == pytest.approx(3.77 / 30.4)
    assert result.ratios[1]["weight_norm"] == pytest.approx(307.0 / 45.5)
    assert result.ratios[1]["test_loss"] == pytest.approx(1.2 / 0.9)


def test_sharper_run_generalising_better_is_a_disagreement():
    (v,) = compare([run(**SGD), run(**SGD_WD)]).verdicts
    assert isinstance(v, Verdict)
    assert (v.a, v.b, v.measure) == ("sgd", "sgd-wd", "lambda_max")
    assert v.sharpness_ratio == pytest.approx(30.4 / 3.77)
    assert v.accuracy_difference_points == pytest.approx(2.0)
    assert v.agrees is False and not v.sharpness_tie and not v.accuracy_tie
    assert "sgd-wd is 8.06x sharper than sgd by lambda_max" in v.text
    assert "generalises 2.00 points better" in v.text
    assert "disagrees" in v.text


def test_sharper_run_generalising_worse_is_an_agreement():
    a = run("flat", 0.80, {"trace": (5.0, 0.2)})
    b = run("sharp", 0.70, {"trace": (50.0, 1.0)})
    (v,) = compare([a, b]).verdicts
    assert v.agrees is True
    assert v.sharpness_ratio == pytest.approx(10.0)
    assert v.accuracy_difference_points == pytest.approx(-10.0)
    assert (
        "sharp is 10x sharper than flat by Tr(H)" in v.text
        and "flat generalises 10.00 points better" in v.text
    )
    assert "agrees" in v.text and "disagrees" not in v.text


def test_sharpness_within_combined_uncertainty_is_a_tie():
    # |11 - 10| = 1 <= 2 * sqrt(0.5^2 + 0.5^2) = 1.41
    a = run("a", 0.70, {"lambda_max": (10.0, 0.5)})
    b = run("b", 0.80, {"lambda_max": (11.0, 0.5)})
    (v,) = compare([a, b]).verdicts
    assert v.sharpness_tie and v.agrees is None and "tie" in v.text
    # the same difference with exact values (uncertainty 0) is no tie
    (v,) = compare(
        [run("a", 0.70, {"lambda_max": (10.0, 0.0)}), run("b", 0.80, {"lambda_max": (11.0, 0.0)})]
    ).verdicts
    assert not v.sharpness_tie and v.agrees is False
    # and tie_sigmas sets the width: 1 <= 0.5 * 1.41 fails
    (v,) = compare([a, b], tie_sigmas=0.5).verdicts
    assert not v.sharpness_tie


def test_accuracy_within_the_binomial_standard_error_is_a_tie():
    # 1,000 test samples: pooled p = 0.9025, SE = sqrt(p (1-p) (2/1000)) = 1.327 points
    a = run("a", 0.900, {"lambda_max": (1.0, 0.0)}, test_size=1000)
    b = run("b", 0.905, {"lambda_max": (9.0, 0.0)}, test_size=1000)
    se = 100 * math.sqrt(0.9025 * 0.0975 * 2 / 1000)
    assert accuracy_threshold_points(a, b) == pytest.approx(se)
    (v,) = compare([a, b]).verdicts
    assert v.accuracy_tie and v.agrees is None and "tie" in v.text
    # 100,000 test samples: SE = 0.13 points, so 0.5 points is a real difference
    a2 = run("a", 0.900, {"lambda_max": (1.0, 0.0)}, test_size=100_000)
    b2 = run("b", 0.905, {"lambda_max": (9.0, 0.0)}, test_size=100_000)
    (v,) = compare([a2, b2]).verdicts
    assert not v.accuracy_tie and v.agrees is False


def test_an_explicit_accuracy_threshold_replaces_the_standard_error():
    a = run("a", 0.900, {"lambda_max": (1.0, 0.0)}, test_size=None)
    b = run("b", 0.905, {"lambda_max": (9.0, 0.0)}, test_size=None)
    with pytest.raises(UsageError, match="test_size"):
        compare([a, b])
    (v,) = compare([a, b], tie_accuracy=1.0).verdicts
    assert v.accuracy_tie
    (v,) = compare([a, b], tie_accuracy=0.1).verdicts
    assert not v.accuracy_tie and v.agrees is False


def test_three_runs_give_every_pair_and_every_shared_measure():
    measures = lambda lm, tr: {"trace": (tr, 0.0), "lambda_max": (lm, 0.0)}  # noqa: E731
    runs = [
        run("r0", 0.70, measures(1.0, 10.0)),
        run("r1", 0.75, measures(2.0, 30.0)),
        run("r2", 0.80, measures(4.0, 5.0)),
    ]
    result = compare(runs)
    pairs = [(v.a, v.b, v.measure) for v in result.verdicts]
    assert pairs == [
        ("r0", "r1", "lambda_max"),
        ("r0", "r1", "trace"),
        ("r0", "r2", "lambda_max"),
        ("r0", "r2", "trace"),
        ("r1", "r2", "lambda_max"),
        ("r1", "r2", "trace"),
    ]
    agrees = {(v.a, v.b, v.measure): v.agrees for v in result.verdicts}
    assert agrees[("r0", "r1", "trace")] is False  # r1 sharper and better
    assert agrees[("r0", "r2", "lambda_max")] is False  # r2 sharper and better
    assert agrees[("r1", "r2", "lambda_max")] is False
    assert agrees[("r0", "r2", "trace")] is True  # r2 flatter and better
    assert agrees[("r1", "r2", "trace")] is True
    assert [sorted(r) for r in result.ratios] == [
        ["lambda_max", "test_loss", "trace", "weight_norm"]
    ] * 3


def test_weight_norm_normalisation_flips_the_papers_verdict():
    # Granziol 2020: weight decay raises lambda_max 8x for SGD, but times ||w||^2
    # the no-wd solution is the sharper one.
    def with_normalised(spec):
        lam, unc = spec["measures"]["lambda_max"]
        measures = {
            "lambda_max": (lam, unc),
            "lambda_max_normalised": (lam * spec["weight_norm"] ** 2, 0.0),
        }
        return run(**{**spec, "measures": measures})

    result = compare([with_normalised(SGD), with_normalised(SGD_WD)])
    by_measure = {v.measure: v for v in result.verdicts}
    assert list(by_measure) == ["lambda_max", "lambda_max_normalised"]
    assert by_measure["lambda_max"].agrees is False
    assert by_measure["lambda_max_normalised"].agrees is True
    assert by_measure["lambda_max_normalised"].sharpness_ratio == pytest.approx(
        (30.4 * 45.5**2) / (3.77 * 307.0**2)
    )


def test_gap_is_in_points():
    assert run("a", 0.75, {}, train_accuracy=0.99).gap == pytest.approx(24.0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: run("a", 77.0, {}),  # a percentage, not a fraction
        lambda: run("a", 0.5, {"lambda_max": (1.0, -0.1)}),  # a negative uncertainty
        lambda: run("a", 0.5, {"lambda_max": (math.nan, 0.1)}),  # a value that is not finite
        lambda: run("a", 0.5, {"lambda_max": (1.0, math.inf)}),  # converged, infinite error
        lambda: compare([run("a", 0.5, {})]),
        lambda: compare([run("a", 0.5, {}), run("a", 0.6, {})]),
    ],
)
def test_bad_input_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        bad()


def test_an_unconverged_measure_may_have_an_infinite_uncertainty_and_gets_no_verdict():
    a = run("a", 0.90, {"lambda_max": (1.0, 0.01)})
    b = run("b", 0.70, {"lambda_max": (10.0, math.inf, False)})
    v = verdict(a, b, "lambda_max", accuracy_points=0.5)
    assert (v.agrees, v.converged, v.sharpness_tie, v.accuracy_tie) == (None, False, False, False)
    assert v.sharpness_ratio == pytest.approx(10.0)
    assert v.text == (
        "lambda_max of b did not converge (1 vs 10): not converged, no verdict on flatness."
    )


def test_measures_are_judged_in_the_documented_order():
    names = ["relative_flatness", "zeta", "trace", "lambda_max", "alpha", "frobenius"]
    a = run("a", 0.70, {m: (1.0, 0.0) for m in names})
    b = run("b", 0.80, {m: (2.0, 0.0) for m in names})
    order = [v.measure for v in compare([a, b]).verdicts]
    assert order == ["lambda_max", "trace", "frobenius", "relative_flatness", "alpha", "zeta"]
    assert "frobenius_normalised" not in MEASURE_ORDER  # no measure of that name exists


def one_run(name):
    """The arm fields of a single run known by its final accuracy alone."""
    return {"n": 1, "runs": [name], "judged_accuracy": None, "spread": {}}


def test_the_comparison_document_is_exact():
    a = run("a", 0.70, {"lambda_max": (2.0, 0.5)}, weight_norm=4.0, test_loss=0.5, test_size=None)
    b = run(
        "b", 0.75, {"lambda_max": (8.0, 0.0, False)}, weight_norm=2.0, test_loss=1.0, test_size=None
    )
    doc = comparison_as_dict(compare([a, b], tie_accuracy=1.0))
    assert list(doc)[-1] == "provenance"  # how it was made: tests/test_provenance.py
    del doc["provenance"]
    common = dict(
        optimizer="sgd",
        l2=0.0,
        weight_decay=0.0,
        averaging=None,
        train_loss=0.01,
        train_accuracy=1.0,
    )
    assert doc == {
        "runs": [
            {
                "name": "a",
                **common,
                "test_loss": 0.5,
                "test_accuracy": 0.70,
                "generalisation_gap": pytest.approx(30.0),
                "weight_norm": 4.0,
                "test_size": None,
                **one_run("a"),
                "lambda_max": {
                    "value": 2.0,
                    "uncertainty": 0.5,
                    "kind": "bound",
                    "converged": True,
                },
            },
            {
                "name": "b",
                **common,
                "test_loss": 1.0,
                "test_accuracy": 0.75,
                "generalisation_gap": pytest.approx(25.0),
                "weight_norm": 2.0,
                "test_size": None,
                **one_run("b"),
                "lambda_max": {
                    "value": 8.0,
                    "uncertainty": 0.0,
                    "kind": "bound",
                    "converged": False,
                },
            },
        ],
        "ratios": [
            {"name": "a", "lambda_max": 1.0, "weight_norm": 1.0, "test_loss": 1.0},
            {"name": "b", "lambda_max": 4.0, "weight_norm": 0.5, "test_loss": 2.0},
        ],
        "verdicts": [
            {
                "a": "a",
                "b": "b",
                "measure": "lambda_max",
                "sharpness_ratio": 4.0,
                "accuracy_difference_points": pytest.approx(5.0),
                "sharpness_tie": False,
                "accuracy_tie": False,
                "agrees": None,
                "text": "lambda_max of b did not converge (2 vs 8): not converged, no verdict on flatness.",
                "converged": False,
                "accuracy_threshold_points": 1.0,
                "accuracy_noise": "threshold",
                "accuracy_noise_counts": (),
            }
        ],
    }
    assert list(doc["runs"][0]) == [
        "name",
        "optimizer",
        "l2",
        "weight_decay",
        "averaging",
        "train_loss",
        "test_loss",
        "train_accuracy",
        "test_accuracy",
        "generalisation_gap",
        "weight_norm",
        "test_size",
        "n",
        "runs",
        "judged_accuracy",
        "spread",
        "lambda_max",
    ]


@pytest.fixture
def trained(make_config):
    """``trained("sgd-s0", seed=0, l2=...)``: a tiny logistic regression run in ./NAME."""

    def make(name, **options):
        options = {"epochs": 4, "train_samples": 200, **options}
        return train(make_config(out=Path(name), **options)).run_dir

    return make


def _epochs(run_dir, last=5):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["test_accuracy"] for r in rows][-last:]


def test_arms_of_seeds_are_judged_on_their_mean_over_the_last_epochs(trained):
    sgd = [trained(f"sgd-s{seed}", seed=seed) for seed in (0, 1)]
    l2 = [trained(f"l2-s{seed}", seed=seed, l2=0.05) for seed in (0, 1)]
    result = compare_checkpoints([sgd, l2], LAMBDA_MAX, last_epochs=3)
    a, b = result.runs
    assert (a.name, a.runs, b.name, b.runs) == (
        "sgd",
        ("sgd-s0", "sgd-s1"),
        "l2",
        ("l2-s0", "l2-s1"),
    )
    # each run: the mean of its last 3 epochs; the arm: the mean over its seeds
    means = [statistics.fmean(_epochs(run, last=3)) for run in sgd]
    assert a.accuracy is not None and a.accuracy.value == pytest.approx(statistics.fmean(means))
    assert a.spread["judged_accuracy"].sd == pytest.approx(statistics.stdev(means))
    assert a.accuracy.source == "seeds" and a.seeds == 2
    (v,) = result.verdicts
    assert v.accuracy_noise in ("seeds", "binomial", "seeds+binomial", "binomial+seeds")
    assert v.accuracy_difference_points == pytest.approx(
        100 * (b.judged_accuracy - a.judged_accuracy)
    )


def test_one_run_is_judged_on_its_last_epochs_and_an_averaged_run_on_its_final_model(trained):
    plain = trained("sgd")
    averaged = trained("avg", average_from=2)
    a, b = compare_checkpoints([plain, averaged], LAMBDA_MAX).runs
    assert a.accuracy is not None and (a.accuracy.source, a.accuracy.count) == ("epochs", 4)
    assert a.accuracy.value == pytest.approx(statistics.fmean(_epochs(plain)))
    assert a.accuracy.noise == pytest.approx(statistics.stdev(_epochs(plain)))
    # the history is of the live iterate, never of the averaged model that was saved
    assert b.accuracy is not None and b.accuracy.source == "binomial"
    assert b.accuracy.value == b.test_accuracy and b.accuracy.count == b.test_size


def test_runs_of_one_arm_must_differ_in_their_seed_alone(trained):
    sgd, l2 = trained("sgd-s0"), trained("l2-s1", seed=1, l2=0.05)
    with pytest.raises(UsageError, match="sgd-s0 has l2 0.0, l2-s1 has l2 0.05"):
        compare_checkpoints([[sgd, l2], sgd], LAMBDA_MAX)
    with pytest.raises(UsageError, match="the same training"):
        compare_checkpoints([[sgd, sgd], l2], LAMBDA_MAX)
    result = CliRunner().invoke(app, ["compare", f"{sgd},{l2}", str(sgd)])
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: runs of one arm must differ only in their seed: sgd-s0 has l2")
