"""The provenance record: resolved device, versions, command line, time, git commit."""

import platform
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import torch

import flatcli.workflows.provenance as prov
from flatcli.analysis.rank import rank_report
from flatcli.analysis.verdicts import RunSummary, compare
from flatcli.config import DemoConfig
from flatcli.curvature.results import Estimate
from flatcli.errors import UsageError
from flatcli.report.schema import ENVELOPE_KEYS
from flatcli.report.text import demo_as_dict, rank_as_dict, rank_fields
from flatcli.workflows.compare import comparison_as_dict, comparison_fields
from flatcli.workflows.demo import DemoResult
from flatcli.workflows.provenance import git_commit, provenance, resolved_device


def test_the_record_has_every_field_with_its_type(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["flatcli", "sharpness", "run", "--json"])
    before = datetime.now(timezone.utc).replace(microsecond=0)
    record = provenance("cpu")
    assert list(record) == ["device", "python", "torch", "cuda", "command", "time", "git_commit"]
    assert record["device"] == "cpu"
    assert record["python"] == platform.python_version()
    assert record["torch"] == torch.__version__
    assert record["cuda"] == torch.version.cuda
    assert record["cuda"] is None or isinstance(record["cuda"], str)
    assert record["command"] == ["flatcli", "sharpness", "run", "--json"]
    when = datetime.fromisoformat(record["time"])
    assert when.utcoffset() == timedelta(0)
    assert before <= when <= datetime.now(timezone.utc)


def test_the_device_is_resolved_never_auto():
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert provenance()["device"] == expected
    assert resolved_device("auto") == expected
    assert resolved_device(torch.device("cpu")) == "cpu"
    with pytest.raises(UsageError):
        resolved_device("no-such-device")


def test_the_commit_is_git_rev_parse_head_inside_a_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    git = [
        "git",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "-c",
        "commit.gpgsign=false",
    ]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "-C", str(repo), "add", "a.txt"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert len(head) == 40
    monkeypatch.chdir(repo / "sub")  # anywhere inside the repository
    assert git_commit() == head
    assert provenance("cpu")["git_commit"] == head


def test_the_commit_is_none_outside_a_repository(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(outside)
    assert git_commit() is None
    assert provenance("cpu")["git_commit"] is None


def test_the_commit_is_none_without_git(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(prov.subprocess, "run", missing)
    assert git_commit(tmp_path) is None

    def hangs(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", prov.GIT_TIMEOUT_S)

    monkeypatch.setattr(prov.subprocess, "run", hangs)
    assert git_commit(tmp_path) is None


def _comparison():
    runs = [
        RunSummary(
            name=name,
            optimizer="sgd",
            l2=0.0,
            weight_decay=0.0,
            averaging=None,
            train_loss=0.01,
            train_accuracy=1.0,
            test_accuracy=acc,
            weight_norm=1.0,
            test_loss=1.0,
            measures={"lambda_max": Estimate(value=lam, uncertainty=0.0, kind="exact")},
            test_size=None,
        )
        for name, acc, lam in (("a", 0.7, 2.0), ("b", 0.8, 8.0))
    ]
    return compare(runs, tie_accuracy=1.0)


def test_the_compare_and_rank_documents_end_with_the_record():
    comparison = _comparison()
    doc = comparison_as_dict(comparison)
    assert list(doc) == [*comparison_fields(comparison), "provenance"]
    assert doc["provenance"]["device"] != "auto" and doc["provenance"]["torch"] == torch.__version__
    record = provenance("cpu")
    assert comparison_as_dict(comparison, record)["provenance"] == record

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    report = rank_report(model, x, y, 3)
    rank_doc = rank_as_dict(report, record)
    assert list(rank_doc) == [*ENVELOPE_KEYS, *rank_fields(report), "provenance"]
    assert list(rank_doc)[-2:] == ["statement", "provenance"] and rank_doc["provenance"] == record

    demo = DemoResult(
        DemoConfig(), {("logreg", "L2"): comparison}, {"logreg": report}, "logreg", [], []
    )
    demo_doc = demo_as_dict(replace(demo, provenance=record))
    assert list(demo_doc)[-1] == "provenance" and demo_doc["provenance"] == record
    # one record, at the top: the parts measured in the same call do not repeat it
    assert "provenance" not in demo_doc["comparisons"][0]
    assert "provenance" not in demo_doc["rank"]["logreg"]
    assert demo_as_dict(demo)["provenance"]["device"] != "auto"
