"""The paper's experiments through the CLI: rank-bound, compare, the scaling sweep and the demo."""

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flatcli import load_checkpoint, load_dataset
from flatcli.cli import app
from flatcli.config import DemoConfig
from flatcli.curvature import logistic_regression_hessian
from flatcli.errors import RunExistsError
from flatcli.report.text import demo_as_dict
from flatcli.workflows.checkpoint import read_metadata, save_checkpoint
from flatcli.workflows.demo import ensure_run, run_demo, variant_config

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def test_rank_bound_of_logistic_regression_is_c_minus_1_times_d_plus_1_and_the_rank_obeys_it():
    doc = json.loads(invoke("rank-bound", SAMPLES / "logreg-sgd.safetensors", "--json").stdout)
    assert doc["paper_bound"] == 9 * 65 and doc["num_params"] == 650 and doc["num_classes"] == 10
    assert doc["layers"] == [{"name": "fc", "kind": "linear", "fan_in": 64, "neurons": 10}]
    assert doc["data_bound"] == 1437 * 9
    assert doc["exact"] and doc["numerical_rank"] <= doc["paper_bound"]
    assert doc["ggn_rank"] == doc["numerical_rank"]  # logistic regression: H is its own GGN
    assert doc["bound_fraction"] == pytest.approx(585 / 650)
    assert [r["fraction"] for r in doc["effective_rank"]] == [0.01, 0.001]
    assert {r["kind"] for r in doc["effective_rank"]} == {"exact"}
    assert "Linear model: the bound is exact" in doc["statement"]


def test_rank_bound_estimate_for_an_mlp_is_labelled_an_estimate():
    result = invoke("rank-bound", SAMPLES / "mlp-sgd.safetensors", "--estimate", "--samples", 200)
    assert "estimate" in result.stdout and "Nonlinear model" in result.stdout
    doc = json.loads(
        invoke(
            "rank-bound", SAMPLES / "mlp-sgd.safetensors", "--estimate", "--samples", 200, "--json"
        ).stdout
    )
    assert doc["exact"] is False and doc["numerical_rank"] is None
    (estimate,) = doc["effective_rank"]  # the one shape of exact ranks, as an estimate object
    assert estimate["fraction"] == 0.01 and estimate["kind"] == "stderr"
    assert doc["paper_bound"] == 9 * (65 + 65) and doc["data_bound"] == 200 * 9


def test_scaling_sweep_reproduces_the_logistic_regression_closed_form():
    doc = json.loads(
        invoke(
            "sharpness",
            SAMPLES / "logreg-sgd.safetensors",
            "--scale",
            "0.5,1,2,4",
            "--exact",
            "--dtype",
            "float64",
            "--json",
        ).stdout
    )
    assert (doc["command"], doc["split"], doc["scale_layer"]) == ("sharpness", "train", "all")
    rows = doc["rows"]
    model, _ = load_checkpoint(SAMPLES / "logreg-sgd.safetensors")
    x, y = load_dataset("digits").tensors
    weight, bias = (p.detach().double() for p in model.parameters())
    accuracies = set()
    for row in rows:
        a = row["scale"]
        h = logistic_regression_hessian(a * weight, a * bias, x.flatten(1).double(), y)
        eigs = torch.linalg.eigvalsh(h)
        assert row["lambda_max"]["value"] == pytest.approx(float(eigs[-1]), rel=1e-9)
        assert row["trace"]["value"] == pytest.approx(float(h.trace()), rel=1e-9)
        logits = a * (x.flatten(1).double() @ weight.T + bias)
        assert row["split_loss"] == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6
        )
        accuracies.add(row["split_accuracy"])
    assert len(accuracies) == 1  # scaling a linear model never changes its predictions
    lam = [r["lambda_max"]["value"] for r in rows]
    assert lam == sorted(lam, reverse=True)  # larger weights, flatter Hessian


def test_compare_reports_ratios_and_computed_verdicts():
    a, b = SAMPLES / "logreg-sgd.safetensors", SAMPLES / "logreg-sgd-l2.safetensors"
    doc = json.loads(
        invoke(
            "compare",
            a,
            b,
            "--measures",
            "lambda_max,trace,lambda_max_normalised",
            "--exact",
            "--dtype",
            "float64",
            "--json",
        ).stdout
    )
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"logreg-sgd", "logreg-sgd-l2"}
    assert runs["logreg-sgd-l2"]["l2"] == 5e-3 and runs["logreg-sgd"]["l2"] == 0
    ratio = runs["logreg-sgd-l2"]["lambda_max"]["value"] / runs["logreg-sgd"]["lambda_max"]["value"]
    assert doc["ratios"][1]["lambda_max"] == pytest.approx(ratio)
    assert doc["ratios"][0]["lambda_max"] == 1.0
    verdicts = {v["measure"]: v for v in doc["verdicts"]}
    assert set(verdicts) == {"lambda_max", "trace", "lambda_max_normalised"}
    v = verdicts["lambda_max"]
    assert v["sharpness_ratio"] == pytest.approx(ratio)
    # the text states the computed numbers
    assert f"{max(ratio, 1 / ratio):.3g}x sharper" in v["text"]
    human = invoke("compare", a, b, "--measures", "lambda_max", "--exact", "--dtype", "float64")
    assert "logreg-sgd-l2" in human.stdout and "sharper" in human.stdout


def test_compare_needs_two_runs():
    result = runner.invoke(app, ["compare", str(SAMPLES / "logreg-sgd.safetensors")])
    assert result.exit_code == 2 and "at least two runs" in result.stderr


def test_sample_checkpoints_are_small_and_documented():
    files = sorted(SAMPLES.glob("*.safetensors"))
    assert {f.stem for f in files} >= {
        "logreg-sgd",
        "logreg-sgd-l2",
        "mlp-sgd",
        "mlp-sgd-l2",
        "mlp-gadam",
    }
    readme = (SAMPLES / "README.md").read_text()
    for f in files:
        assert f.stat().st_size < 1_000_000
        assert f.name in readme and "flatcli train" in readme
        load_checkpoint(f)


def _pair_held(comp):
    """Claims 2 and 3 from a comparison document: B sharper (lambda_max) and better."""
    (v,) = [v for v in comp["verdicts"] if v["measure"] == "lambda_max"]
    if not v["converged"]:
        return None
    b_sharper = not v["sharpness_tie"] and v["sharpness_ratio"] > 1
    if not b_sharper:
        return False
    if v["accuracy_tie"]:
        return None
    return v["accuracy_difference_points"] > 0


def _sweep_held(rows):
    """The mechanism: one accuracy at every scale, lambda_max falling at scales >= 1."""
    up = sorted((r for r in rows if r["scale"] >= 1), key=lambda r: r["scale"])
    lam = [r["lambda_max"]["value"] for r in up]
    same = len({r["split_accuracy"] for r in rows}) == 1
    return same and len(up) > 1 and all(b < a for a, b in zip(lam, lam[1:], strict=False))


def _rank_held(rank):
    """Claim 4: the effective rank at 1e-2 within the smallest bound (an estimate: -2 se)."""
    (eff,) = [r for r in rank["effective_rank"] if r["fraction"] == 0.01]
    return eff["value"] - 2 * (eff["uncertainty"] or 0) <= rank["min_bound"]


def test_demo_runs_end_to_end_in_reduced_size(tmp_path):
    config = DemoConfig.reduced(out=tmp_path / "demo", device="cpu")
    result = run_demo(config)
    doc = demo_as_dict(result)
    assert len(doc["runs"]) == 6 and len(doc["comparisons"]) == 4
    # 4 pairs, the sweep, one rank per model; each verdict recomputed from the numbers
    assert [c["model"] for c in doc["claims"]] == ["logreg"] * 2 + ["mlp"] * 2 + [
        "logreg",
        "logreg",
        "mlp",
    ]
    expected = [_pair_held(comp) for comp in doc["comparisons"]]
    expected.append(_sweep_held(doc["sweep"]["rows"]))
    expected += [_rank_held(doc["rank"][m]) for m in ("logreg", "mlp")]
    assert [c["held"] for c in doc["claims"]] == expected
    for c in doc["claims"]:
        prefix = {True: "held", False: "did not hold"}.get(c["held"])
        assert prefix is None or prefix in c["evidence"]
    # every claim about a pair quotes the measured lambda_max of both runs
    for comp in doc["comparisons"]:
        a, b = comp["runs"]
        claim = next(
            c
            for c in doc["claims"]
            if c["model"] == comp["model"]
            and ("Gadam" in c["claim"]) == (comp["contrast"] == "Gadam vs SGD")
        )
        assert f"{a['lambda_max']['value']:.3g}" in claim["evidence"]
        assert f"{b['lambda_max']['value']:.3g}" in claim["evidence"]
    # a second run reuses the trained runs and their cached sharpness
    mtime = (tmp_path / "demo" / "mlp-sgd" / "model.safetensors").stat().st_mtime_ns
    again = run_demo(config)
    assert (tmp_path / "demo" / "mlp-sgd" / "model.safetensors").stat().st_mtime_ns == mtime
    assert [c.held for c in again.claims] == [c.held for c in result.claims]


def test_demo_refuses_to_overwrite_a_different_run(tmp_path):
    run_demo(DemoConfig.reduced(out=tmp_path / "demo", device="cpu", models=("logreg",)))
    with pytest.raises(RunExistsError):
        run_demo(
            DemoConfig.reduced(out=tmp_path / "demo", device="cpu", models=("logreg",), epochs=4)
        )


def test_demo_cli_prints_the_claims_table(tmp_path):
    result = runner.invoke(
        app,
        [
            "demo",
            "--models",
            "logreg",
            "--epochs",
            2,
            "--train-samples",
            200,
            "--samples",
            200,
            "--out",
            tmp_path / "d",
        ],
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("The paper's claims on digits")  # the claims first
    claims = [re.match(r"(held|did not hold|inconclusive) +logreg ", line) for line in lines]
    assert sum(m is not None for m in claims) == 4  # L2, Gadam, the sweep, the rank
    assert lines[-1].startswith("Details (") and "--verbose" in lines[-1]


def test_the_demo_reuses_a_run_recorded_before_an_option_existed(tmp_path):
    tc = variant_config(DemoConfig.reduced(out=tmp_path, epochs=1), "logreg", "sgd")
    ensure_run(tc, overwrite=False)
    ckpt = tc.out / "model.safetensors"
    _, meta = read_metadata(ckpt)
    del meta["train"][
        "sync_bn"
    ]  # written by a flatcli that did not know the option: its default applied
    model, _ = load_checkpoint(ckpt)
    save_checkpoint(ckpt, model, meta)
    before = ckpt.read_bytes()
    assert (
        ensure_run(tc, overwrite=False) == tc.out and ckpt.read_bytes() == before
    )  # reused, not retrained
