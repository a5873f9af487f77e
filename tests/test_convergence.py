"""Honest uncertainties and early checks (issue 8).

Specification:
- a Lanczos run that stops before its tolerance (``--max-iter``) is "not converged": its
  residual is no bound on lambda_max / lambda_min (``Estimate.converged`` False, JSON
  ``"converged": false``, the table says "not converged", never "(bound)"); the flag
  survives the ``sharpness.json`` cache and is inherited by spectral_norm and the
  ``*_normalised`` measures; ``--tol`` >= 1 or non-finite and ``--memory-gb`` NaN, 0 or
  negative are refused (exit 2) before anything is measured;
- a standard error from fewer than MIN_SAMPLES (10) samples is "not converged": with 2
  or 3 Hutch++ remainder samples the error is often many reported standard errors
  (checked against the dense Hessian); budgets Hutch++ cannot split (< 4) are refused
  when the options are read, not after other measures;
- compare never calls a not-converged measure a tie or a win (agrees=None, "not converged");
- compare refuses runs trained on different data sets (one line naming both) before
  measuring anything, and warns when a run is measured on another data set;
- every path, option and data set is checked before the first measurement (compare with a
  missing run, rank-bound --threshold -1 / >= 1 / nan).
"""

from __future__ import annotations

import json
import math
from importlib import import_module as module  # flatcli's package attributes may shadow its modules
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flatcli.analysis.claims import pair_claim
from flatcli.analysis.measures import measure
from flatcli.analysis.rank import rank_report
from flatcli.analysis.sharpness_report import SharpnessReport
from flatcli.analysis.verdicts import RunSummary, check_measure, compare, verdict
from flatcli.cli import app
from flatcli.config import SharpnessConfig
from flatcli.curvature import (
    CurvatureOperator,
    dense_hessian,
    hutchinson_trace,
    trace_and_frobenius,
)
from flatcli.curvature.results import Estimate
from flatcli.curvature.trace import MIN_SAMPLES
from flatcli.errors import CheckpointError, DataError, UnknownNameError, UsageError
from flatcli.models import build_model
from flatcli.report.tables import comparison_table, sharpness_table
from flatcli.workflows.checkpoint import load_checkpoint, save_checkpoint
from flatcli.workflows.compare import (
    check_runs,
    compare_checkpoints,
    comparison_as_dict,
    summarise,
)
from flatcli.workflows.data import load_dataset
from flatcli.workflows.source import CheckpointSource

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
LOGREG = SAMPLES / "logreg-sgd.safetensors"


@pytest.fixture(scope="module")
def point():
    """Logistic regression on 300 digits and its exact Hessian spectrum (float64)."""
    model, _ = load_checkpoint(LOGREG)
    x, y = load_dataset("digits", samples=300).tensors
    op = CurvatureOperator(model, x, y, dtype=torch.float64)
    h = dense_hessian(op).double()
    return model, x, y, h, torch.linalg.eigvalsh(0.5 * (h + h.T))


def text_of(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


# -- 1. Lanczos stopped early ---------------------------------------------------------------


def test_lanczos_stopped_by_max_iter_is_not_converged_and_its_residual_no_bound(point):
    model, x, y, _, eigs = point
    report = measure(
        model,
        x,
        y,
        SharpnessConfig(
            measures=("lambda_max", "lambda_max_normalised"), max_iter=3, dtype="float64"
        ),
    )
    lam = report.measures["lambda_max"]
    exact = float(eigs[-1])
    assert abs(lam.value - exact) > lam.uncertainty  # the "bound" of a stopped run is none
    assert lam.converged is False and report.measures["lambda_max_normalised"].converged is False
    doc = report.as_dict()
    assert (
        doc["lambda_max"]["converged"] is False
        and doc["lambda_max_normalised"]["converged"] is False
    )
    table = text_of(sharpness_table(report))
    assert "not converged" in table and "(bound)" not in table

    good = measure(model, x, y, SharpnessConfig(measures=("lambda_max",), dtype="float64"))
    assert good.measures["lambda_max"].converged is True
    assert (
        abs(good.measures["lambda_max"].value - exact)
        <= good.measures["lambda_max"].uncertainty + 1e-9
    )
    assert good.as_dict()["lambda_max"]["converged"] is True
    assert "(bound)" in text_of(sharpness_table(good))


@pytest.mark.parametrize("measures", [("lambda_min",), ("lambda_max", "lambda_min")])
def test_lambda_min_and_spectral_norm_say_not_converged_too(point, measures):
    model, x, y, _, _ = point
    report = measure(model, x, y, SharpnessConfig(measures=measures, max_iter=2, dtype="float64"))
    assert report.measures["lambda_min"].converged is False
    if "lambda_max" in measures:
        assert report.measures["spectral_norm"].converged is False
        assert report.as_dict()["spectral_norm"]["converged"] is False


def test_converged_survives_the_cache_round_trip(point):
    model, x, y, _, _ = point
    report = measure(
        model,
        x,
        y,
        SharpnessConfig(measures=("lambda_max", "lambda_min", "trace"), max_iter=2, probes=40),
    )
    doc = json.loads(json.dumps(report.as_dict()))
    back = SharpnessReport.from_dict(doc)
    for name in ("lambda_max", "lambda_min", "spectral_norm", "trace"):
        assert back.measures[name].converged == report.measures[name].converged, name
    assert (
        back.measures["lambda_max"].converged is False and back.measures["trace"].converged is True
    )
    # an entry written before the flag existed cannot vouch for itself; exact values can
    del doc["trace"]["converged"], doc["lambda_max"]["converged"]
    old = SharpnessReport.from_dict(doc)
    assert (
        old.measures["trace"].converged is False and old.measures["lambda_max"].converged is False
    )
    exact = Estimate(1.0, 0.0, "exact").as_dict()
    del exact["converged"]
    assert SharpnessReport.from_dict({**doc, "trace": exact}).measures["trace"].converged is True


@pytest.mark.parametrize(
    "options",
    [
        dict(tol=math.inf),
        dict(tol=1.0),
        dict(tol=2.0),
        dict(tol=math.nan),
        dict(tol=0.0),
        dict(memory_gb=math.nan),
        dict(memory_gb=0.0),
        dict(memory_gb=-1.0),
        dict(memory_gb=math.inf),
        dict(rho=math.inf),
        dict(samples=0),
    ],
)
def test_meaningless_tolerances_and_budgets_are_refused(options):
    with pytest.raises(UsageError):
        SharpnessConfig(**options)


@pytest.mark.parametrize(
    ("options", "named"),
    [(dict(curvature="hesian"), "hessian, ggn"), (dict(bn_mode="train"), "eval, batch, full")],
)
def test_unknown_curvature_and_batchnorm_names_are_refused_by_the_config(options, named):
    with pytest.raises(UnknownNameError) as raised:
        SharpnessConfig(**options)
    assert raised.value.exit_code == 2 and named in str(raised.value.hint)


@pytest.mark.parametrize(
    "args",
    [
        ["--tol", "inf"],
        ["--tol", "1"],
        ["--memory-gb", "nan"],
        ["--memory-gb", "0"],
        ["--memory-gb", "-2"],
        ["--probes", "2", "--measures", "lambda_max,trace"],
    ],
)
def test_cli_refuses_bad_tolerance_memory_and_probes_with_exit_2(args):
    result = runner.invoke(app, ["sharpness", str(LOGREG), "--no-cache", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


# -- 1b. standard errors from too few samples ----------------------------------------------


def test_hutchpp_standard_error_of_a_few_samples_is_marked_not_converged(point):
    """Against the dense trace: with 2 remainder samples the reported standard error is
    often far too small (errors of many standard errors), so such results must not pass for
    converged; with MIN_SAMPLES and more they do, and their errors are of standard size.
    """
    model, x, y, h, eigs = point
    op = CurvatureOperator(model, x, y, dtype=torch.float64)
    trace, fro = float(h.trace()), float(eigs.pow(2).sum().sqrt())
    tiny = [trace_and_frobenius(op, probes=4, seed=s) for s in range(30)]
    assert all(t.samples == 2 and not t.converged and not f.converged for t, f in tiny)
    z = [abs(t.value - trace) / t.uncertainty for t, _ in tiny] + [
        abs(f.value - fro) / f.uncertainty for _, f in tiny
    ]
    assert max(z) > 5  # what "not converged" protects against
    budget = MIN_SAMPLES + 3  # b d = 3 products build the subspace, the rest are samples
    assert not trace_and_frobenius(op, probes=budget - 1, seed=0)[0].converged
    enough = [trace_and_frobenius(op, probes=budget, seed=s) for s in range(30)]
    assert all(t.samples >= MIN_SAMPLES and t.converged and f.converged for t, f in enough)
    z = sorted(abs(t.value - trace) / t.uncertainty for t, _ in enough)
    assert z[len(z) // 2] < 1.5 and z[-1] < 6


def test_hutchinson_and_unmet_targets_are_not_converged(point):
    model, x, y, _, _ = point
    op = CurvatureOperator(model, x, y, dtype=torch.float64)
    assert not hutchinson_trace(op, probes=3, seed=0).converged
    assert hutchinson_trace(op, probes=MIN_SAMPLES, seed=0).converged
    # a target the budget cannot meet
    missed = trace_and_frobenius(
        op, probes=20, target_rel_stderr=1e-9, max_hvps=30, targets=("trace",)
    )
    assert not missed[0].converged and missed[1].converged  # the target was the trace's only


def test_tiny_probe_budgets_in_a_report(point):
    model, x, y, _, _ = point
    report = measure(
        model, x, y, SharpnessConfig(measures=("trace", "frobenius", "trace_normalised"), probes=6)
    )
    for name in ("trace", "frobenius", "trace_normalised"):
        assert (
            report.measures[name].converged is False
            and report.as_dict()[name]["converged"] is False
        )
    table = text_of(sharpness_table(report))
    assert "not converged" in table and "(s.e.)" not in table
    for probes in (1, 2, 3):  # refused when the options are read, not after lambda_max
        with pytest.raises(UsageError, match="probes"):
            SharpnessConfig(measures=("lambda_max", "trace"), probes=probes)
    SharpnessConfig(measures=("lambda_max",), probes=2)  # not used: not refused
    with pytest.raises(UsageError, match="sharpness-samples"):
        SharpnessConfig(measures=("adaptive_sharpness",), sharpness_samples=1)


def test_adaptive_sharpness_of_few_draws_is_not_converged(point):
    model, x, y, _, _ = point
    few = measure(
        model, x, y, SharpnessConfig(measures=("adaptive_sharpness",), sharpness_samples=3)
    )
    assert few.measures["adaptive_sharpness"].converged is False


# -- 2. compare never judges a measure that did not converge ---------------------------------


def run(name, accuracy, value, uncertainty=0.01, converged=True):
    return RunSummary(
        name=name,
        optimizer="sgd",
        l2=0.0,
        weight_decay=0.0,
        averaging=None,
        train_loss=0.0,
        test_loss=1.0,
        test_accuracy=accuracy,
        train_accuracy=1.0,
        weight_norm=1.0,
        measures={
            "lambda_max": Estimate(
                value=value, uncertainty=uncertainty, kind="bound", converged=converged
            )
        },
        test_size=10_000,
    )


@pytest.mark.parametrize("values", [(1.0, 10.0), (5.0, 5.0)])  # would be a clear verdict / a tie
def test_a_measure_that_did_not_converge_gets_no_verdict(values):
    a, b = run("a", 0.90, values[0]), run("b", 0.70, values[1], converged=False)
    v = verdict(a, b, "lambda_max", accuracy_points=0.5)
    assert v.agrees is None and v.converged is False and not v.sharpness_tie
    assert "not converged" in v.text and "tie" not in v.text and "agrees" not in v.text
    comparison = compare([a, b])
    assert comparison.verdicts[0].agrees is None
    doc = comparison_as_dict(comparison)
    assert (
        doc["runs"][1]["lambda_max"]["converged"] is False
        and doc["verdicts"][0]["converged"] is False
    )
    assert "not converged" in text_of(comparison_table(comparison))
    # converged, the same numbers do get their verdict
    assert compare([a, run("b", 0.70, values[1])]).verdicts[0].converged is True


def test_the_demo_claims_nothing_from_a_measure_that_did_not_converge():
    comparison = compare([run("a", 0.70, 1.0), run("b", 0.90, 10.0, converged=False)])
    claim = pair_claim("logreg", comparison, "B is sharper yet generalises better")
    assert claim.held is None and "did not converge" in claim.evidence
    assert (
        pair_claim("logreg", compare([run("a", 0.70, 1.0), run("b", 0.90, 10.0)]), "x").held is True
    )


def test_unconverged_measures_may_have_an_infinite_uncertainty_converged_ones_not():
    check_measure(Estimate(value=1.0, uncertainty=math.inf, kind="bound", converged=False))
    with pytest.raises(UsageError):
        check_measure(Estimate(value=1.0, uncertainty=math.inf, kind="bound"))


def test_summaries_carry_the_flag_and_a_nan_stderr_is_not_converged(point):
    model, x, y, _, _ = point
    report = measure(model, x, y, SharpnessConfig(measures=("lambda_max",), max_iter=2))
    info = load_checkpoint(LOGREG)[1]
    assert summarise("a", info, report, 360).measures["lambda_max"].converged is False
    report.measures["trace"] = Estimate(1.0, math.nan, "stderr")
    m = summarise("a", info, report, 360).measures["trace"]
    assert m.converged is False and m.uncertainty == math.inf


# -- 3. runs of different data sets -------------------------------------------------------------


def fake_run(
    tmp_path: Path, name: str, dataset: str, shape=(1, 28, 28), classes=10, **metrics
) -> Path:
    model = build_model("logreg", input_shape=shape, num_classes=classes)
    meta = {
        "arch": {"name": "logreg", "kwargs": {}},
        "dataset": {"name": dataset, "num_classes": classes, "input_shape": list(shape)},
        "train": {"optimizer": "sgd"},
        "metrics": {
            "test_loss": 1.0,
            "test_accuracy": 0.5,
            "train_loss": 1.0,
            "train_accuracy": 0.5,
            **metrics,
        },
    }
    return save_checkpoint(tmp_path / name / "model.safetensors", model, meta).parent


@pytest.fixture
def no_measuring(monkeypatch):
    """Fail the test if anything is measured or any data set is loaded."""

    def boom(*args, **kwargs):
        raise AssertionError("measured before every run was checked")

    for where, name in [
        ("flatcli.workflows.sharpness", "sharpness"),
        ("flatcli.workflows.sharpness", "checkpoint_sharpness"),
        ("flatcli.workflows.sharpness", "load_point"),
        ("flatcli.workflows.data", "load_dataset"),
        ("flatcli.workflows.compare", "checkpoint_sharpness"),
        ("flatcli.workflows.compare", "load_point"),
        ("flatcli.workflows.compare", "load_dataset"),
    ]:
        monkeypatch.setattr(module(where), name, boom)


def test_runs_trained_on_different_data_sets_are_refused_before_measuring(tmp_path, no_measuring):
    mnist = fake_run(tmp_path, "on-mnist", "mnist")
    with pytest.raises(DataError, match="different data sets") as info:
        compare_checkpoints([LOGREG, mnist], SharpnessConfig())
    assert (
        "digits" in str(info.value) and "mnist" in str(info.value) and "\n" not in str(info.value)
    )


def test_cli_refuses_digits_against_mnist_in_one_line(tmp_path, no_measuring):
    mnist = fake_run(tmp_path, "on-mnist", "mnist")
    result = runner.invoke(app, ["compare", str(LOGREG), str(mnist), "--measures", "lambda_max"])
    assert result.exit_code == 1, result.output
    assert "digits" in result.stderr and "mnist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_measuring_on_another_data_set_of_the_same_shape_warns(tmp_path, no_measuring):
    a, b = fake_run(tmp_path, "a", "mnist"), fake_run(tmp_path, "b", "mnist")
    with pytest.warns(UserWarning, match="trained on mnist but is measured on fashion-mnist"):
        runs = check_runs([a, b], CheckpointSource(dataset="fashion-mnist"))
    assert [r.measured_on for r in runs] == ["fashion-mnist"] * 2
    with pytest.raises(DataError, match="cannot be measured on digits"):  # another input shape
        check_runs([a, b], CheckpointSource(dataset="digits"))
    c10, c100 = (
        fake_run(tmp_path, "c", "cifar10", (3, 32, 32)),
        fake_run(tmp_path, "d", "cifar10", (3, 32, 32)),
    )
    with pytest.raises(DataError, match="100 classes"):  # same shape, other classes
        check_runs([c10, c100], CheckpointSource(dataset="cifar100"))


# -- 4. everything checked first ----------------------------------------------------------------


def test_compare_with_a_missing_run_measures_nothing(tmp_path, no_measuring):
    with pytest.raises(CheckpointError, match="missing-b"):
        compare_checkpoints([LOGREG, tmp_path / "missing-b"], SharpnessConfig())
    broken = tmp_path / "broken.safetensors"
    broken.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="broken"):
        compare_checkpoints([LOGREG, broken], SharpnessConfig())
    with pytest.raises(UsageError, match="tie-sigmas"):
        compare_checkpoints([LOGREG, LOGREG], SharpnessConfig(), tie_sigmas=math.nan)


@pytest.mark.parametrize(
    "metrics",
    [
        dict(test_accuracy="high"),
        dict(test_accuracy=97.0),
        dict(train_loss=None),
        dict(test_loss=math.nan),
    ],
)
def test_compare_refuses_malformed_metrics_before_measuring(tmp_path, no_measuring, metrics):
    digits = fake_run(tmp_path, "a", "digits", shape=(1, 8, 8))
    bad = fake_run(tmp_path, "b", "digits", shape=(1, 8, 8), **metrics)
    with pytest.raises(CheckpointError, match="metrics"):
        compare_checkpoints([digits, bad], SharpnessConfig())


def test_cli_compare_with_a_missing_run_fails_at_once(tmp_path, no_measuring):
    result = runner.invoke(app, ["compare", str(LOGREG), str(tmp_path / "missing-b"), "--no-cache"])
    assert (
        result.exit_code == 1 and "missing-b" in result.stderr and "does not exist" in result.stderr
    )


@pytest.mark.parametrize("value", ["-1", "1", "2", "nan"])
def test_rank_bound_threshold_is_checked_before_anything_is_computed(value, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("loaded before the options were checked")

    monkeypatch.setattr(module("flatcli.workflows.rank"), "load_point", boom)
    result = runner.invoke(app, ["rank-bound", str(LOGREG), "--threshold", value])
    assert result.exit_code == 2, result.output
    assert "threshold" in result.stderr


@pytest.mark.parametrize(
    "options",
    [
        dict(threshold=-1.0),
        dict(threshold=1.0),
        dict(threshold=math.nan),
        dict(fraction=0.0),
        dict(fraction=1.0),
        dict(probes=0),
    ],
)
def test_rank_report_checks_its_options_first(options, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("computed before the options were checked")

    monkeypatch.setattr(module("flatcli.analysis.rank"), "rank_bound", boom)
    model = torch.nn.Linear(4, 3)
    with pytest.raises(UsageError):
        rank_report(model, torch.randn(10, 4), torch.randint(0, 3, (10,)), 3, **options)


def test_rank_bound_fraction_is_checked_first(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("loaded before the options were checked")

    monkeypatch.setattr(module("flatcli.workflows.rank"), "load_point", boom)
    result = runner.invoke(app, ["rank-bound", str(LOGREG), "--estimate", "--fraction", "1.5"])
    assert result.exit_code == 2 and "fraction" in result.stderr
