"""The sharpness.json cache and the sharpness command's inputs and outputs (issue 8).

Every run here is a tiny logistic regression (or MLP) on 100-200 digits images, saved
directly as a checkpoint: no training, no download.
"""

import errno
import importlib
import json
import multiprocessing
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import flatcli.analysis.sweep as sweep
import flatcli.workflows.cache as cache_module
import flatcli.workflows.data
from flatcli import build_model, load_dataset, save_checkpoint
from flatcli.analysis.measures import measure
from flatcli.cli import app
from flatcli.cli.progress import PREFIX
from flatcli.config import SharpnessConfig
from flatcli.errors import CheckpointError, DataError, NonFiniteError, UsageError
from flatcli.workflows.cache import CACHE_FILE, CACHE_FORMAT, ResultCache, cache_file
from flatcli.workflows.sharpness import load_point, sharpness
from flatcli.workflows.source import CheckpointSource

runner = CliRunner()


def said(stderr: str) -> list[str]:
    """The lines of ``stderr`` other than progress (``flatcli: TASK ...``, one per task in a log)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith(PREFIX)]


sharpness_module = importlib.import_module(
    "flatcli.workflows.sharpness"
)  # flatcli.sharpness is also a function
DIGITS = {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]}


def make_run(folder: Path, arch: str = "logreg", nan: bool = False, **kwargs) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, input_shape=(1, 8, 8), num_classes=10, **kwargs)
    if nan:
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
    save_checkpoint(
        folder / "model.safetensors",
        model,
        {"arch": {"name": arch, "kwargs": kwargs}, "dataset": DIGITS, "train": {"l2": 0.0}},
    )
    return folder


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def cfg(measures, **kw):
    return SharpnessConfig(
        measures=tuple(measures.split(",")),
        samples=kw.pop("samples", 150),
        max_iter=30,
        probes=20,
        **kw,
    )


def numbers(report):
    """What a report prints about its measures (JSON), without the cost and the cached flag."""
    doc = report.as_dict()
    return {
        k: v
        for k, v in doc.items()
        if k not in ("hvps", "seconds", "cached", "cached_measures", "provenance")
    }


def forbid_measuring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(
            "measured although everything was cached (or before the options were checked)"
        )

    monkeypatch.setattr(sharpness_module, "measure", fail)


# --- 1. the key: data, and per-measure results -------------------------------------------


def test_a_cached_result_is_not_served_for_other_data(run, monkeypatch):
    first = sharpness(run, cfg("lambda_max,trace"))
    assert sharpness(run, cfg("lambda_max,trace")).cached == ("lambda_max", "trace")
    real = flatcli.workflows.data.load_dataset

    def other_pixels(*args, **kwargs):  # the same data set name and shape, one pixel changed
        x, y = real(*args, **kwargs).tensors
        x = x.clone()
        x[0, 0, 3, 3] += 1.0
        return torch.utils.data.TensorDataset(x, y)

    monkeypatch.setattr(flatcli.workflows.data, "load_dataset", other_pixels)
    changed = sharpness(run, cfg("lambda_max,trace"))
    assert changed.cached == () and changed.hvps > 0
    assert changed.loss != first.loss

    def other_labels(*args, **kwargs):
        x, y = real(*args, **kwargs).tensors
        return torch.utils.data.TensorDataset(x, (y + 1) % 10)

    monkeypatch.setattr(flatcli.workflows.data, "load_dataset", other_labels)
    assert sharpness(run, cfg("lambda_max,trace")).cached == ()
    key = next(iter(json.loads((run / CACHE_FILE).read_text())["entries"]))
    for part in (
        '"data": ',
        '"device": "cpu"',
        '"dtype": "float32"',
        '"checkpoint": ',
        '"flatcli": ',
    ):
        assert part in key
    assert '"measures"' not in key  # the list of measures is not part of the key


def test_a_subset_or_another_order_of_cached_measures_costs_nothing_and_equals_a_fresh_run(
    run, monkeypatch
):
    sharpness(run, cfg("lambda_max,trace,frobenius,density"))
    fresh = sharpness(run, cfg("frobenius,density,lambda_max"), use_cache=False)
    with monkeypatch.context() as m:
        forbid_measuring(m)
        hit = sharpness(run, cfg("frobenius,density,lambda_max"))
    assert hit.fully_cached and hit.hvps == 0 and hit.as_dict()["cached"] is True
    assert numbers(hit) == numbers(fresh)
    assert list(hit.as_dict()) == list(fresh.as_dict())  # same order of keys as a fresh report
    assert fresh.as_dict()["cached"] is False


def test_the_report_ends_with_this_calls_provenance_which_never_enters_the_cache(run, monkeypatch):
    first = sharpness(run, cfg("lambda_max"))
    doc = first.as_dict()
    assert list(doc)[-1] == "provenance"
    assert doc["provenance"]["device"] == "cpu" and doc["provenance"]["torch"] == torch.__version__
    stored = (run / CACHE_FILE).read_text()
    assert "provenance" not in stored and "git_commit" not in stored
    monkeypatch.setattr(sys, "argv", ["flatcli", "sharpness", "again"])
    with monkeypatch.context() as m:
        forbid_measuring(m)
        hit = sharpness(run, cfg("lambda_max"))
    assert hit.fully_cached  # a different command line is still a cache hit
    assert list(hit.as_dict()) == list(doc)
    assert hit.as_dict()["provenance"]["command"] == ["flatcli", "sharpness", "again"]


def test_measures_sharing_work_are_cached_with_their_partners(run, monkeypatch):
    both = sharpness(run, cfg("lambda_max,lambda_min"))
    # lambda_max alone comes from a Lanczos run of its own, which stops at another step than
    # the shared run for both ends: it is measured, not served from the shared run.
    alone = sharpness(run, cfg("lambda_max"))
    assert alone.cached == () and alone.hvps > 0
    assert numbers(alone) == numbers(sharpness(run, cfg("lambda_max"), use_cache=False))
    # both ends, in another order, with trace: the ends (and spectral_norm) from the cache, trace measured
    partial = sharpness(run, cfg("lambda_min,trace,lambda_max"))
    assert set(partial.cached) == {"lambda_min", "lambda_max", "spectral_norm"}
    doc = partial.as_dict()
    assert doc["cached"] is False and set(doc["cached_measures"]) == set(partial.cached)
    fresh = sharpness(run, cfg("lambda_min,trace,lambda_max"), use_cache=False)
    assert numbers(partial) == numbers(fresh)
    assert partial.measures["lambda_max"].as_dict() == both.measures["lambda_max"].as_dict()
    with monkeypatch.context() as m:
        forbid_measuring(m)
        assert sharpness(run, cfg("trace,lambda_max,lambda_min")).fully_cached


def test_a_partial_hit_measures_only_the_missing_measures_and_their_partners(run, monkeypatch):
    sharpness(run, cfg("lambda_max,lambda_min"))
    asked = []
    real = sharpness_module.measure

    def spy(model, inputs, targets, config, **kwargs):
        asked.append(config.measures)
        return real(model, inputs, targets, config, **kwargs)

    monkeypatch.setattr(sharpness_module, "measure", spy)
    report = sharpness(run, cfg("lambda_min,trace,lambda_max"))
    assert asked == [("trace",)]
    assert list(report.measures) == ["lambda_min", "trace", "lambda_max", "spectral_norm"]
    # one end lost from the file: its partner is measured again with it (one shared Lanczos run)
    doc = json.loads((run / CACHE_FILE).read_text())
    (entry,) = doc["entries"].values()
    del entry["measures"]["lambda_min@lambda_max+lambda_min"]
    (run / CACHE_FILE).write_text(json.dumps(doc))
    asked.clear()
    again = sharpness(run, cfg("lambda_max,lambda_min,trace"))
    assert asked == [("lambda_max", "lambda_min")] and again.cached == ("trace",)


def test_the_cache_file_of_a_run_directory_and_of_another_checkpoint(run, tmp_path):
    assert cache_file(run) == cache_file(run / "model.safetensors") == run / CACHE_FILE
    other = tmp_path / "elsewhere.safetensors"
    (run / "model.safetensors").rename(other)
    assert cache_file(other) is None
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        cache_file(run)


def test_with_a_target_stderr_trace_and_frobenius_are_cached_with_their_partners(run):
    sharpness(run, cfg("trace,frobenius", target_stderr=0.05))
    alone = sharpness(run, cfg("trace", target_stderr=0.05))
    assert alone.cached == ()  # its top-up follows only the trace's error: other numbers
    assert numbers(alone) == numbers(
        sharpness(run, cfg("trace", target_stderr=0.05), use_cache=False)
    )


def test_per_layer_results_are_cached_per_measure(tmp_path, monkeypatch):
    run = make_run(tmp_path / "mlp", "mlp", width=6)
    sharpness(run, cfg("trace,frobenius", per_layer=True, exact=True, dtype="float64"))
    fresh = sharpness(
        run, cfg("frobenius", per_layer=True, exact=True, dtype="float64"), use_cache=False
    )
    with monkeypatch.context() as m:
        forbid_measuring(m)
        hit = sharpness(run, cfg("frobenius", per_layer=True, exact=True, dtype="float64"))
    assert hit.fully_cached and numbers(hit) == numbers(fresh) and len(hit.layers) == 2


def test_the_cli_says_a_cache_hit(run):
    args = [
        "sharpness",
        str(run),
        "--measures",
        "lambda_max",
        "--samples",
        "120",
        "--max-iter",
        "30",
        "--json",
    ]
    first = runner.invoke(app, args)
    assert (
        first.exit_code == 0
        and json.loads(first.stdout)["cached"] is False
        and not said(first.stderr)
    )
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and json.loads(second.stdout)["cached"] is True
    assert second.stderr.strip() == f"cached result from {run / CACHE_FILE}; --no-cache recomputes"
    third = runner.invoke(app, args + ["--no-cache"])
    assert json.loads(third.stdout)["cached"] is False and not said(third.stderr)
    table = runner.invoke(app, args[:-1])
    assert (
        table.exit_code == 0 and "cached result from" in table.stderr and "lambda" in table.stdout
    )
    more = runner.invoke(app, args[:3] + ["trace,lambda_max"] + args[4:])
    assert more.exit_code == 0, more.stderr
    assert json.loads(more.stdout)["cached_measures"] == ["lambda_max"]
    assert said(more.stderr) == [
        f"cached lambda_max from {run / CACHE_FILE} (the rest measured now); --no-cache recomputes"
    ]
    assert [line.split(" ")[1] for line in more.stderr.splitlines() if line.startswith(PREFIX)] == [
        "trace"  # measured now: lambda_max, read from the cache, is not said to be measured
    ]


# --- 2. concurrent writers ---------------------------------------------------------------


def _writer(path: str, tag: str, count: int) -> None:
    cache = ResultCache(Path(path))
    for i in range(count):
        assert cache.update(
            "key", {"loss": 1.0}, [], {f"{tag}{i}": {"result": {"value": float(i)}}}
        )


def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / CACHE_FILE
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), tag, 25)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    slots = ResultCache(path).read()["key"]["measures"]
    assert set(slots) == {f"{tag}{i}" for tag in "ab" for i in range(25)}
    assert (tmp_path / (CACHE_FILE + ".lock")).exists()
    assert not list(tmp_path.glob("*.tmp"))


# --- 3. a cache that cannot be written or read -------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_cache_that_cannot_be_written_costs_one_warning_not_the_result(run, monkeypatch, code):
    def refuse(path, text):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache_module, "atomic_write_text", refuse)
    result = runner.invoke(
        app,
        [
            "sharpness",
            str(run),
            "--measures",
            "trace",
            "--samples",
            "100",
            "--probes",
            "20",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["trace"]["value"] > 0
    lines = said(result.stderr)
    assert len(lines) == 1 and "warning:" in lines[0] and "could not write" in lines[0]
    assert not (run / CACHE_FILE).exists()


def test_a_lock_file_that_cannot_be_opened_costs_one_warning(run):
    (run / (CACHE_FILE + ".lock")).mkdir()  # os.open fails on it, as in a read-only folder
    with pytest.warns(UserWarning, match="could not write"):
        report = sharpness(run, cfg("trace"))
    assert report.measures["trace"].value > 0


@pytest.mark.parametrize(
    "content",
    [
        b"[]",
        b'{"entries": [1, 2]}',
        b'{"entries": {"k": 3}}',
        b'{"format": %d, "entries": {"k": "v"}}' % CACHE_FORMAT,
        b"\xff\xfe\x00garbage",
        b"",
        b'"a string"',
        b'{"entries": null}',
    ],
)
@pytest.mark.parametrize("no_cache", [False, True])
def test_a_corrupt_cache_is_read_as_empty_and_replaced(run, content, no_cache):
    (run / CACHE_FILE).write_bytes(content)
    args = [
        "sharpness",
        str(run),
        "--measures",
        "trace",
        "--samples",
        "100",
        "--probes",
        "20",
        "--json",
    ]
    result = runner.invoke(app, args + (["--no-cache"] if no_cache else []))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["cached"] is False
    lines = said(result.stderr)
    assert len(lines) == 1 and "corrupt" in lines[0]
    doc = json.loads((run / CACHE_FILE).read_text())  # rewritten, valid, with the result
    assert doc["format"] == CACHE_FORMAT and len(doc["entries"]) == 1
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["cached"] is True


def test_a_corrupt_entry_of_the_right_key_is_read_as_empty(run):
    sharpness(run, cfg("trace"))
    path = run / CACHE_FILE
    doc = json.loads(path.read_text())
    key = next(iter(doc["entries"]))
    for broken in (
        {"head": 1, "layers": [], "measures": {}},
        {"head": {}, "layers": [], "measures": {"trace": {"result": {"value": 1.0}}}},
    ):
        doc["entries"][key] = broken
        path.write_text(json.dumps(doc))
        with pytest.warns(UserWarning, match="corrupt"):
            report = sharpness(run, cfg("trace"))
        assert report.cached == () and report.measures["trace"].value > 0


# --- 4. output paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, target",
    [
        ("--plot", "missing/x.png"),
        ("--density-out", "missing/x.csv"),
        ("--density-out", "."),
        ("--plot", "."),
        ("--plot", "x.unknown"),
    ],
)
def test_output_paths_are_checked_before_measuring(run, monkeypatch, tmp_path, option, target):
    forbid_measuring(monkeypatch)
    monkeypatch.setattr(
        sharpness_module, "load_point", lambda *a, **k: pytest.fail("loaded before the check")
    )
    result = runner.invoke(
        app, ["sharpness", str(run), "--measures", "density", option, str(tmp_path / target)]
    )
    assert result.exit_code == 2, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert option in result.stderr


def test_a_density_file_that_cannot_be_written_keeps_the_result(run, tmp_path, monkeypatch):
    out = tmp_path / "d.csv"
    monkeypatch.setattr(
        Path,
        "write_text",
        lambda self, text, *a, **k: (
            (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            if self == out
            else None
        ),
    )
    result = runner.invoke(
        app,
        [
            "sharpness",
            str(run),
            "--measures",
            "density",
            "--samples",
            "100",
            "--density-out",
            str(out),
            "--json",
            "--no-cache",
        ],
    )
    assert result.exit_code == 1
    assert "grid" in json.loads(result.stdout)["density"]  # printed first
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not write")


# --- 5. the data must fit the checkpoint -------------------------------------------------


def test_a_data_set_of_another_input_shape_is_refused_before_loading(run, monkeypatch):
    monkeypatch.setattr(
        flatcli.workflows.data, "load_dataset", lambda *a, **k: pytest.fail("loaded")
    )
    with pytest.raises(
        DataError, match="mnist has inputs of shape 1x28x28, but the checkpoint takes 1x8x8"
    ):
        load_point(run, CheckpointSource(dataset="mnist"))
    for command in (
        ["sharpness", str(run), "--dataset", "mnist"],
        ["rank-bound", str(run), "-d", "mnist"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "1x28x28" in lines[0], result.stderr


def _serve(monkeypatch, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Make every data set load as (inputs, labels)."""
    monkeypatch.setattr(
        flatcli.workflows.data,
        "load_dataset",
        lambda *a, **k: torch.utils.data.TensorDataset(inputs, labels),
    )


def test_data_of_another_shape_under_the_same_name_is_refused(run, monkeypatch):
    _serve(monkeypatch, torch.zeros(20, 1, 28, 28), torch.zeros(20, dtype=torch.long))
    with pytest.raises(DataError, match="shape 1x28x28"):
        load_point(run)


def test_labels_the_model_has_no_output_for_are_refused(run, monkeypatch):
    _serve(monkeypatch, torch.zeros(20, 1, 8, 8), torch.arange(20, dtype=torch.long))
    with pytest.raises(DataError, match="labels up to 19"):
        load_point(run)


def test_another_data_set_of_the_same_shape_is_measured_with_a_warning(run, monkeypatch):
    real = flatcli.workflows.data.load_dataset
    monkeypatch.setitem(
        flatcli.workflows.data.DATASETS, "digits2", flatcli.workflows.data.DATASETS["digits"]
    )
    monkeypatch.setattr(
        flatcli.workflows.data, "load_dataset", lambda name, *a, **k: real("digits", *a, **k)
    )
    with pytest.warns(
        UserWarning, match="measuring on digits2, but the checkpoint was trained on digits"
    ):
        point = load_point(run, CheckpointSource(dataset="digits2"), samples=50)
    assert point.dataset == "digits2" and len(point.targets) == 50


# --- 6. non-finite weights, losses and scales --------------------------------------------


def test_non_finite_weights_are_refused_before_measuring(tmp_path):
    run = make_run(tmp_path / "nan", nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one error, not a warning and an error
        with pytest.raises(NonFiniteError, match="non-finite weights .* fc.weight"):
            load_point(run)
    for command in (
        ["sharpness", str(run), "--measures", "lambda_max"],
        ["sharpness", str(run), "--exact", "--measures", "trace"],
        ["rank-bound", str(run)],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "non-finite weights" in lines[0], result.stderr


def test_measure_raises_a_flatcli_error_not_a_linalg_error():
    torch.manual_seed(0)
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    x, y = load_dataset("digits", samples=50).tensors
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    for exact in (False, True):
        with pytest.raises(NonFiniteError, match="fc.bias"):
            measure(model, x, y, SharpnessConfig(measures=("lambda_max",), exact=exact))
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="loss is nan"):
        measure(model, x, y, SharpnessConfig(measures=("lambda_max",)))


def test_a_scale_that_overflows_is_one_line_before_measuring(tmp_path, monkeypatch):
    run = make_run(tmp_path / "mlp", "mlp", width=6)
    calls = []
    real = sweep.measure
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = runner.invoke(app, ["sharpness", str(run), "--scale", "1,1e30", "--samples", "100"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--scale 1e+30" in lines[0] and "overflow" in lines[0]
    assert calls == []  # refused before the first factor was measured
    result = runner.invoke(app, ["sharpness", str(run), "--scale", "1e39", "--samples", "100"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    point = load_point(run, samples=100)
    with pytest.raises(UsageError, match="1e\\+30"):
        sweep.scaling_sweep(point.model, point.inputs, point.targets, [1e30], SharpnessConfig())
    ok = runner.invoke(
        app,
        [
            "sharpness",
            str(run),
            "--scale",
            "0.5,2",
            "--samples",
            "100",
            "--json",
            "--max-iter",
            "20",
            "--probes",
            "20",
        ],
    )
    assert ok.exit_code == 0, ok.stderr
    assert [point["scale"] for point in json.loads(ok.stdout)["rows"]] == [0.5, 2.0]


def test_plot_and_density_out_do_not_apply_to_a_sweep(run):
    result = runner.invoke(app, ["sharpness", str(run), "--scale", "2", "--density-out", "d.csv"])
    assert result.exit_code == 2 and "--scale" in result.stderr
