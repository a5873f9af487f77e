"""One JSON schema across commands (issue 11): every command's ``--json`` validates against
:data:`flatcli.report.schema.JSON_SCHEMA`, which holds one uncertainty object everywhere and
refuses the old forms; the ``sharpness.json`` cache reads, or re-measures, what older
versions wrote.

The runs are a logistic regression trained for one epoch on 100 digits images and one
saved untrained; measurements use 64 images.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
from cli.fakes import DEMO  # tests/cli/fakes.py
from cli.helpers import invoke_main  # tests/cli/helpers.py
from test_seeds import run  # tests/test_seeds.py: a RunSummary from a few numbers

import flatcli
import flatcli.workflows.demo
from flatcli import build_model, save_checkpoint
from flatcli.analysis.seeds import arm
from flatcli.analysis.sharpness_report import measurement_from_dict
from flatcli.analysis.verdicts import compare
from flatcli.cli._common import print_json
from flatcli.config import SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.report.schema import (
    COMMANDS,
    ENVELOPE_KEYS,
    JSON_SCHEMA,
    SCHEMA_VERSION,
    document,
    json_schema,
    schema_text,
)
from flatcli.report.text import compare_as_dict
from flatcli.workflows.cache import CACHE_FILE, CACHE_FORMAT
from flatcli.workflows.sharpness import sharpness

VALIDATOR = jsonschema.Draft202012Validator(JSON_SCHEMA)
MEASURE = ["--samples", 64, "--max-iter", 30, "--probes", 13, "--json"]


def errors(doc: object) -> list[str]:
    """The schema's complaints about ``doc`` (none: it validates)."""
    return [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def json_of(*args: object) -> dict:
    """``flatcli ARGS`` (with --json among them): its one document on stdout."""
    result = invoke_main(*args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A trained run (via ``flatcli train``) and an untrained one with coupled L2."""
    root = tmp_path_factory.mktemp("runs")
    trained = root / "trained"
    json_of(
        "train",
        "--model",
        "logreg",
        "--epochs",
        1,
        "--train-samples",
        100,
        "--out",
        trained,
        "--json",
    )
    torch.manual_seed(0)
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    dataset = {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]}
    meta = {"arch": {"name": "logreg", "kwargs": {}}, "dataset": dataset, "train": {"l2": 0.01}}
    save_checkpoint(root / "untrained" / "model.safetensors", model, meta)
    return trained, root / "untrained"


@pytest.fixture(scope="module")
def sharpness_doc(runs) -> dict:
    return json_of("sharpness", runs[0], "--measures", "lambda_max,trace,density", *MEASURE)


# --- the schema itself -------------------------------------------------------------------


def test_the_schema_is_a_valid_draft_2020_12_schema_and_dumps_as_json():
    jsonschema.Draft202012Validator.check_schema(JSON_SCHEMA)
    assert json.loads(schema_text()) == json_schema() == JSON_SCHEMA
    assert json_schema() is not JSON_SCHEMA  # a copy to change freely


def test_the_envelope_comes_first_and_provenance_last():
    doc = document("rank-bound", {"a": 1, "provenance": {"device": "cpu"}})
    assert list(doc) == [*ENVELOPE_KEYS, "a", "provenance"]
    assert doc["schema_version"] == SCHEMA_VERSION and doc["flatcli_version"] == flatcli.__version__


@pytest.mark.parametrize(
    "command, body", [("bogus", {"provenance": {}}), ("train", {"train_loss": 1.0})]
)
def test_a_document_needs_a_known_command_and_its_provenance(command, body):
    with pytest.raises(ValueError):
        document(command, body)


def test_print_json_prints_only_enveloped_documents(capsys):
    with pytest.raises(ValueError, match="schema"):
        print_json({"value": 1.0})
    print_json(document("train", {"seconds": math.inf}, {"device": "cpu"}))
    assert json.loads(capsys.readouterr().out)["seconds"] == "inf"


# --- every command's document validates -----------------------------------------------------


def test_train_json_validates(runs):
    doc = json_of(
        "train", "--model", "logreg", "--epochs", 1, "--train-samples", 100, "--out", "t", "--json"
    )
    assert errors(doc) == [] and doc["command"] == "train"
    assert doc["provenance"]["device"] == "cpu"


def test_sharpness_json_validates_with_one_estimate_object_per_measure(sharpness_doc):
    assert errors(sharpness_doc) == [] and sharpness_doc["command"] == "sharpness"
    assert [sharpness_doc[m]["kind"] for m in ("lambda_max", "trace")] == ["bound", "stderr"]
    assert set(sharpness_doc["density"]) == {"grid", "values"}
    assert 0 <= sharpness_doc["split_accuracy"] <= 1 and "accuracy" not in sharpness_doc


def test_sharpness_per_layer_json_validates(runs):
    doc = json_of("sharpness", runs[0], "--measures", "lambda_max", "--per-layer", *MEASURE)
    assert errors(doc) == [] and doc["layers"][0]["lambda_max"]["kind"] == "bound"


def test_a_sweep_is_an_object_with_its_rows_not_a_bare_list(runs):
    doc = json_of("sharpness", runs[0], "--scale", "0.5,2", "--measures", "lambda_max", *MEASURE)
    assert errors(doc) == [] and doc["command"] == "sharpness"
    assert (doc["split"], doc["scale_layer"], [r["scale"] for r in doc["rows"]]) == (
        "train",
        "all",
        [0.5, 2.0],
    )
    assert errors({**doc, "rows": None}) != []


@pytest.mark.parametrize("mode", ["--exact", "--estimate"])
def test_rank_json_validates_and_has_one_effective_rank_shape(runs, mode):
    doc = json_of("rank-bound", runs[0], "--samples", 64, mode, "--json")
    assert errors(doc) == [] and doc["command"] == "rank-bound"
    kind = "exact" if mode == "--exact" else "stderr"
    assert {r["kind"] for r in doc["effective_rank"]} == {kind}
    assert all(
        set(r) == {"fraction", "value", "uncertainty", "kind", "converged"}
        for r in doc["effective_rank"]
    )


def test_compare_json_validates(runs):
    doc = json_of("compare", *runs, "--measures", "lambda_max,trace", *MEASURE)
    assert errors(doc) == [] and doc["command"] == "compare"
    assert {r["lambda_max"]["kind"] for r in doc["runs"]} == {"bound"}


def test_demo_json_validates(monkeypatch):
    monkeypatch.setattr(flatcli.workflows.demo, "run_demo", lambda config, **kw: DEMO)
    doc = json_of("demo", "--no-plots", "--json")
    assert errors(doc) == [] and doc["command"] == "demo"
    assert list(doc)[: len(ENVELOPE_KEYS)] == list(ENVELOPE_KEYS) and list(doc)[-1] == "provenance"


def test_the_paper_protocols_plan_json_validates():
    doc = json_of("demo", "--protocol", "paper", "--dry-run", "--no-estimate", "--json")
    assert errors(doc) == [] and (doc["command"], doc["protocol"]) == ("demo", "paper")


def test_every_command_has_a_body_in_the_schema():
    assert set(COMMANDS) <= set(JSON_SCHEMA["$defs"])  # type: ignore[arg-type]


# --- the schema refuses the old forms --------------------------------------------------------


def test_the_schema_rejects_the_old_value_stderr_form(sharpness_doc):
    old = copy.deepcopy(sharpness_doc)
    trace = old["trace"]
    old["trace"] = {"value": trace["value"], "stderr": trace["uncertainty"], "converged": True}
    assert any("trace" in e for e in errors(old))


def test_the_schema_rejects_an_estimate_with_extra_keys_or_an_unknown_kind(sharpness_doc):
    for change in ({"bound": 0.1}, {"kind": "guess"}):
        doc = copy.deepcopy(sharpness_doc)
        doc["lambda_max"] = {**doc["lambda_max"], **change}
        assert errors(doc) != [], change


def test_the_schema_rejects_an_effective_rank_keyed_by_fraction(runs):
    doc = json_of("rank-bound", runs[0], "--samples", 64, "--json")
    doc["effective_rank"] = {"0.01": 6}
    assert errors(doc) != []


def test_the_schema_rejects_another_schema_version(sharpness_doc):
    assert errors({**sharpness_doc, "schema_version": SCHEMA_VERSION + 1}) != []


# --- what older flatcli versions wrote ---------------------------------------------------------


@pytest.mark.parametrize(
    "old, kind, uncertainty",
    [
        ({"value": 2.0, "bound": 0.01, "converged": True}, "bound", 0.01),
        ({"value": 2.0, "bound": 0.0}, "exact", 0.0),
        ({"value": 2.0, "stderr": 0.5, "converged": False}, "stderr", 0.5),
    ],
)
def test_an_old_estimate_is_read_as_the_kind_it_named(old, kind, uncertainty):
    estimate = measurement_from_dict(old)
    assert isinstance(estimate, Estimate)
    assert (estimate.kind, estimate.uncertainty) == (kind, uncertainty)
    assert estimate.converged is old.get("converged", kind == "exact")


def test_an_estimate_round_trips_through_json_with_infinite_and_unknown_uncertainties():
    for u in (0.25, math.inf):
        e = Estimate(value=1.0, uncertainty=u, kind="stderr", converged=False)
        assert measurement_from_dict(e.as_dict()) == e
    back = measurement_from_dict(
        {"value": 1.0, "uncertainty": None, "kind": "stderr", "converged": False}
    )
    assert isinstance(back, Estimate) and math.isnan(back.uncertainty)


@pytest.mark.parametrize(
    "bad", [{"value": 1.0}, {"value": 1.0, "uncertainty": 0.1, "kind": "x", "converged": True}]
)
def test_anything_else_is_not_an_estimate(bad):
    with pytest.raises(ValueError):
        measurement_from_dict(bad)


def _config() -> SharpnessConfig:
    return SharpnessConfig(measures=("trace",), samples=64, probes=13)


def test_a_cache_file_of_the_old_layout_is_a_miss_measured_again_and_replaced(runs, recwarn):
    run = runs[1]
    (run / CACHE_FILE).unlink(missing_ok=True)
    old_entry = {
        "head": {"split": "train", "loss": 2.3, "accuracy": 0.1},
        "layers": [],
        "measures": {"trace": {"result": {"value": 99.0, "stderr": 0.1, "converged": True}}},
    }
    (run / CACHE_FILE).write_text(json.dumps({"format": 2, "entries": {"old": old_entry}}))
    report = sharpness(run, _config())
    assert report.cached == () and report.measures["trace"].value != 99.0  # measured now
    assert not [w for w in recwarn if "corrupt" in str(w.message)]  # a miss, not an error
    doc = json.loads((run / CACHE_FILE).read_text())
    assert doc["format"] == CACHE_FORMAT and "old" not in doc["entries"]
    assert sharpness(run, _config()).cached == ("trace",)  # the new entry serves the next call


def test_an_old_estimate_in_a_current_entry_is_read_with_its_kind_not_misread(runs):
    run = runs[1]
    (run / CACHE_FILE).unlink(missing_ok=True)
    fresh = sharpness(run, _config()).measures["trace"]
    doc = json.loads((run / CACHE_FILE).read_text())
    (entry,) = doc["entries"].values()
    entry["measures"]["trace"]["result"] = {"value": 5.0, "stderr": 0.25, "converged": True}
    (run / CACHE_FILE).write_text(json.dumps(doc))
    cached = sharpness(run, _config())
    assert cached.cached == ("trace",) and fresh.value != 5.0
    trace = cached.measures["trace"]
    assert isinstance(trace, Estimate)
    assert (trace.value, trace.uncertainty, trace.kind) == (5.0, 0.25, "stderr")


def test_a_comparison_of_arms_of_seeds_validates_with_one_uncertainty_object():
    a = arm([run(f"sgd-s{i}", p) for i, p in enumerate((0.90, 0.92, 0.97))])
    doc = json.loads(json.dumps(compare_as_dict(compare([a, run("b", 0.95, 2.0)]))))
    assert errors(doc) == []
    spread = doc["runs"][0]["spread"]["test_accuracy"]
    assert spread["kind"] == "stderr" and spread["n"] == 3
    broken = copy.deepcopy(doc)
    broken["runs"][0]["spread"]["test_accuracy"] = {"mean": 0.93, "sd": 0.036, "se": 0.021, "n": 3}
    assert errors(broken) != []
