"""``flatcli sharpness``: the report agrees with exact dense computation; JSON; cache; bad input."""

import json
from dataclasses import replace

import pytest
import torch
from cli.helpers import invoke_main  # tests/cli/helpers.py
from typer.testing import CliRunner

from flatcli import load_dataset, train
from flatcli.analysis.measures import measure
from flatcli.cli import app
from flatcli.config import SharpnessConfig
from flatcli.curvature import hessian_via_torch_func
from flatcli.curvature.linalg import exact_density

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs on digits: logistic regression (with L2) and an MLP."""
    from flatcli.config import make_train_config

    root = tmp_path_factory.mktemp("runs")
    base = dict(dataset="digits", epochs=3, device="cpu", train_samples=300)
    train(make_train_config(model="logreg", l2=1e-2, out=root / "logreg", **base))
    train(make_train_config(model="mlp", model_kwargs={"width": 12}, out=root / "mlp", **base))
    return root


def _exact_eigs(run_dir, samples=300):
    from flatcli import load_checkpoint

    model, _ = load_checkpoint(run_dir)
    x, y = load_dataset("digits", samples=samples).tensors
    h = hessian_via_torch_func(model.double(), x.double(), y)
    return torch.linalg.eigvalsh(h)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_iterative_measures_agree_with_the_dense_float64_hessian(runs, name):
    eigs = _exact_eigs(runs / name)
    result = runner.invoke(
        app,
        [
            "sharpness",
            str(runs / name),
            "--samples",
            "300",
            "--dtype",
            "float64",
            "--measures",
            "lambda_max,lambda_min,trace,frobenius",
            "--tol",
            "1e-8",
            "--json",
            "--no-cache",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["lambda_max"]["value"] == pytest.approx(float(eigs[-1]), rel=1e-6)
    assert abs(doc["lambda_min"]["value"] - float(eigs[0])) <= 1e-6 * float(eigs.abs().max())
    assert abs(doc["trace"]["value"] - float(eigs.sum())) <= 4 * doc["trace"]["uncertainty"]
    fro = float(eigs.pow(2).sum().sqrt())
    assert abs(doc["frobenius"]["value"] - fro) <= 4 * doc["frobenius"]["uncertainty"] + 1e-9 * fro
    assert doc["spectral_norm"]["value"] == pytest.approx(float(eigs.abs().max()), rel=1e-6)
    assert list(doc) == [  # the document's layout, in order
        "schema_version",
        "flatcli_version",
        "command",
        "checkpoint",
        "dataset",
        "split",
        "num_samples",
        "num_params",
        "curvature",
        "bn_mode",
        "dtype",
        "device",
        "seed",
        "split_loss",
        "split_accuracy",
        "weight_norm",
        "include_l2",
        "exact",
        "bn_batch_size",
        "lambda_max",
        "lambda_min",
        "trace",
        "frobenius",
        "spectral_norm",
        "hvps",
        "seconds",
        "cached",
        "provenance",
    ]
    assert list(doc["lambda_max"]) == ["value", "uncertainty", "kind", "converged"]
    assert (doc["lambda_max"]["kind"], doc["trace"]["kind"]) == ("bound", "stderr")
    assert (doc["dataset"], doc["split"], doc["curvature"], doc["bn_mode"]) == (
        "digits",
        "train",
        "hessian",
        "eval",
    )
    assert (doc["dtype"], doc["device"], doc["seed"], doc["exact"]) == ("float64", "cpu", 0, False)
    assert doc["num_samples"] == 300 and doc["num_params"] == len(eigs)
    assert doc["cached"] is False and doc["hvps"] > 0 and doc["bn_batch_size"] is None


def test_target_stderr_adds_probes_until_both_estimates_meet_it(runs):
    eigs = _exact_eigs(runs / "mlp")
    base = [
        "sharpness",
        str(runs / "mlp"),
        "--samples",
        "300",
        "--dtype",
        "float64",
        "--measures",
        "trace,frobenius",
        "--probes",
        "30",
        "--json",
        "--no-cache",
    ]
    plain = json.loads(runner.invoke(app, base).stdout)
    result = runner.invoke(app, base + ["--target-stderr", "0.05"])
    doc = json.loads(result.stdout)
    assert (
        plain["trace"]["uncertainty"] > 0.05 * plain["trace"]["value"]
    )  # 30 products are not enough ...
    assert doc["trace"]["uncertainty"] <= 0.05 * doc["trace"]["value"]  # ... so more were added
    assert (
        doc["frobenius"]["uncertainty"] <= 0.05 * doc["frobenius"]["value"]
        and doc["hvps"] > plain["hvps"]
    )
    assert abs(doc["trace"]["value"] - float(eigs.sum())) <= 4 * doc["trace"]["uncertainty"]
    assert "note:" not in result.stderr
    capped = runner.invoke(app, base + ["--target-stderr", "0.001"])  # beyond 10 x 30 products
    assert (
        capped.exit_code == 0
        and "ran out" in capped.stderr
        and json.loads(capped.stdout)["hvps"] <= 300
    )
    bad = runner.invoke(app, base + ["--target-stderr", "0"])
    assert (
        bad.exit_code != 0
        and len(bad.stderr.strip().splitlines()) == 1
        and "target-stderr" in bad.stderr
    )


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_exact_mode_equals_dense_eigenvalues(runs, name):
    eigs = _exact_eigs(runs / name)
    result = runner.invoke(
        app,
        [
            "sharpness",
            str(runs / name),
            "--samples",
            "300",
            "--exact",
            "--dtype",
            "float64",
            "--measures",
            "lambda_max,trace,frobenius,density",
            "--json",
        ],
    )
    doc = json.loads(result.stdout)
    assert doc["lambda_max"] == {
        "value": pytest.approx(float(eigs[-1]), rel=1e-9),
        "uncertainty": 0.0,
        "kind": "exact",
        "converged": True,
    }
    assert doc["trace"]["value"] == pytest.approx(float(eigs.sum()), rel=1e-9)
    grid, values = torch.tensor(doc["density"]["grid"]), torch.tensor(doc["density"]["values"])
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)
    # the one broadening rule of exact and SLQ densities (flatcli.curvature.linalg)
    ref_grid, ref_values = exact_density(eigs)
    width = float(eigs.max() - eigs.min())
    got_grid = torch.tensor(doc["density"]["grid"], dtype=torch.float64)
    got_values = torch.tensor(doc["density"]["values"], dtype=torch.float64)
    assert torch.allclose(got_grid, ref_grid, rtol=0, atol=1e-9 * width)
    assert torch.allclose(got_values, ref_values, rtol=1e-6, atol=1e-9 * float(ref_values.max()))


def test_include_l2_adds_the_checkpoints_coefficient(runs):
    plain = runner.invoke(
        app,
        [
            "sharpness",
            str(runs / "logreg"),
            "--exact",
            "--dtype",
            "float64",
            "--measures",
            "lambda_max,trace",
            "--json",
        ],
    )
    with_l2 = runner.invoke(
        app,
        [
            "sharpness",
            str(runs / "logreg"),
            "--exact",
            "--dtype",
            "float64",
            "--measures",
            "lambda_max,trace",
            "--include-l2",
            "--json",
        ],
    )
    a, b = json.loads(plain.stdout), json.loads(with_l2.stdout)
    assert b["lambda_max"]["value"] == pytest.approx(a["lambda_max"]["value"] + 1e-2, rel=1e-9)
    assert b["trace"]["value"] == pytest.approx(
        a["trace"]["value"] + 1e-2 * a["num_params"], rel=1e-9
    )
    assert b["include_l2"] == 1e-2 and a["include_l2"] == 0.0


def test_results_are_cached_in_the_run_directory_by_settings(runs):
    args = [
        "sharpness",
        str(runs / "mlp"),
        "--measures",
        "lambda_max",
        "--json",
        "--samples",
        "200",
    ]
    first = json.loads(runner.invoke(app, args).stdout)
    cache = json.loads((runs / "mlp" / "sharpness.json").read_text())["entries"]
    assert any('"samples": 200' in key for key in cache)
    second = json.loads(runner.invoke(app, args).stdout)
    cost = ("hvps", "seconds", "cached", "provenance")  # provenance: each call's own time
    assert {k: v for k, v in second.items() if k not in cost} == {
        k: v for k, v in first.items() if k not in cost
    }
    assert (
        first["cached"] is False and second["cached"] is True and second["hvps"] == 0
    )  # served from the cache
    third = json.loads(runner.invoke(app, args + ["--no-cache"]).stdout)
    assert (
        third["lambda_max"] == first["lambda_max"]
        and third["cached"] is False
        and third["hvps"] > 0
    )


def test_per_layer_gives_each_layers_diagonal_block(runs):
    doc = json.loads(
        runner.invoke(
            app,
            [
                "sharpness",
                str(runs / "mlp"),
                "--per-layer",
                "--exact",
                "--dtype",
                "float64",
                "--measures",
                "trace",
                "--json",
                "--samples",
                "300",
            ],
        ).stdout
    )
    # the trace is the sum of the diagonal blocks' traces
    assert sum(layer["trace"]["value"] for layer in doc["layers"]) == pytest.approx(
        doc["trace"]["value"], rel=1e-9
    )
    assert sum(layer["num_params"] for layer in doc["layers"]) == doc["num_params"]


def test_batchnorm_buffers_are_untouched_by_a_measurement():
    from flatcli import build_model

    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, channels=4, batchnorm=True)
    model.train()
    x, y = load_dataset("digits", samples=64).tensors
    with torch.no_grad():
        model(x)  # give the running statistics some non-default values
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("eval", "batch"):
        report = measure(
            model, x, y, SharpnessConfig(measures=("lambda_max",), bn_mode=mode, max_iter=10)
        )
        assert report.bn_mode == mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_plain_state_dict_with_a_model_factory(tmp_path):
    from safetensors.torch import save_file

    factory = tmp_path / "mymodel.py"
    factory.write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
        "def wrong():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))\n"
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("mymodel", factory)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    save_file(
        {k: v.contiguous() for k, v in mod.build().state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    ok = runner.invoke(
        app,
        [
            "sharpness",
            str(tmp_path / "w.safetensors"),
            "--model-factory",
            f"{factory}:build",
            "--dataset",
            "digits",
            "--measures",
            "lambda_max",
            "--json",
        ],
    )
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["num_params"] == 650
    bad = runner.invoke(
        app,
        [
            "sharpness",
            str(tmp_path / "w.safetensors"),
            "--model-factory",
            f"{factory}:wrong",
            "--dataset",
            "digits",
        ],
    )
    assert bad.exit_code == 1 and "do not match" in bad.stderr
    missing = runner.invoke(
        app,
        [
            "sharpness",
            str(tmp_path / "w.safetensors"),
            "--model-factory",
            "no_such_module_xyz:build",
            "--dataset",
            "digits",
        ],
    )
    assert missing.exit_code == 1 and "cannot import" in missing.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--measures", "sharpest"], 2, "unknown measure"),
        (["--samples", "100000"], 1, "only"),
        (["--split", "validation"], 2, "'validation' is not one of 'train', 'test'"),
        (["--curvature", "fisher"], 2, "'fisher' is not one of 'hessian', 'ggn'"),
    ],
)
def test_bad_input_is_one_clear_line(runs, args, code, message):
    result = invoke_main("sharpness", runs / "mlp", *args)  # as the console script runs it
    assert result.exit_code == code and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_exact_refuses_a_model_too_large(tmp_path):
    from flatcli import build_model, save_checkpoint

    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, width=64)
    meta = {
        "arch": {"name": "mlp", "kwargs": {"width": 64, "depth": 1}},
        "dataset": {"name": "digits", "num_classes": 10, "input_shape": [1, 28, 28]},
    }
    save_checkpoint(tmp_path / "big.safetensors", model, meta)
    # a digits-shaped data set does not fit a 28x28 model; use the library directly on random data
    from flatcli.errors import TooLargeError

    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    with pytest.raises(TooLargeError):
        measure(model, x, y, SharpnessConfig(measures=("trace",), exact=True, dtype="float64"))


def test_chunk_size_follows_the_memory_budget_and_chunking_changes_no_result():
    from flatcli import build_model
    from flatcli.curvature import CurvatureOperator, suggest_chunk_size

    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, channels=4)
    x, y = load_dataset("digits", samples=64).tensors
    small = suggest_chunk_size(model, x, 64, budget_bytes=2**20)
    large = suggest_chunk_size(model, x, 64, budget_bytes=2**26)
    assert small >= 1 and large > small
    v = torch.randn(sum(p.numel() for p in model.parameters()), 6, dtype=torch.float64)
    one = CurvatureOperator(model, x, y, dtype=torch.float64, chunk_size=1).matmat(v)
    all_ = CurvatureOperator(model, x, y, dtype=torch.float64).matmat(v)
    assert torch.allclose(one, all_, rtol=1e-10, atol=1e-12)


def test_on_the_cpu_a_block_is_a_loop_over_its_vectors_sharing_each_batch_graph():
    from flatcli import build_model
    from flatcli.curvature import memory_bounded

    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, width=16)
    x, _ = load_dataset("digits", samples=64).tensors
    settings = memory_bounded(model, x, 32)
    assert settings == {"batch_size": 32, "chunk_size": 1, "cache_graph": True}


def test_status_reports_the_running_estimate_and_each_result():
    from flatcli import build_model

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, width=16)
    x, y = load_dataset("digits", samples=100).tensors
    said: list[str] = []
    report = measure(
        model,
        x,
        y,
        SharpnessConfig(measures=("lambda_max", "trace"), probes=12),
        status=said.append,
    )
    steps = [s for s in said if s.startswith("lambda_max (Lanczos step")]
    assert (
        len(steps) + 1 == report.measures["lambda_max"].hvps >= 3
    )  # one line per step; +1: the float64 re-check
    lam, tr = report.measures["lambda_max"], report.measures["trace"]
    assert f"lambda_max {lam.value:.6g} ± {lam.uncertainty:.2g}" in said
    assert said[-1] == f"trace {tr.value:.6g} ± {tr.uncertainty:.2g}"


def test_automatic_batches_keep_a_batchs_activations_small_on_the_cpu():
    from flatcli import build_model
    from flatcli.curvature import (
        DEFAULT_BATCH,
        activation_bytes_per_sample,
        auto_batch_size,
        memory_bounded,
    )
    from flatcli.curvature.operator import CPU_BATCH_BYTES, MIN_AUTO_BATCH

    x = torch.randn(3000, 1, 28, 28)
    cnn = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, channels=16)
    per_image = activation_bytes_per_sample(cnn, x)
    batch = auto_batch_size(cnn, x)
    assert MIN_AUTO_BATCH <= batch < DEFAULT_BATCH and batch == CPU_BATCH_BYTES // per_image
    assert (
        memory_bounded(cnn, x)["batch_size"] == batch
        and memory_bounded(cnn, x, 500)["batch_size"] == 500
    )
    mlp = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, width=64)
    assert (
        auto_batch_size(mlp, x) == DEFAULT_BATCH and auto_batch_size(mlp, x[:100]) == 100
    )  # capped at N


def test_batch_statistics_use_the_documented_batch_whatever_the_device(monkeypatch):
    import flatcli.analysis.measures as measures_module
    from flatcli import build_model

    seen = []
    real = measures_module.memory_bounded
    monkeypatch.setattr(
        measures_module,
        "memory_bounded",
        lambda m, x, b, **kw: seen.append(b) or real(m, x, b, **kw),
    )
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, width=8)
    x, y = load_dataset("digits", samples=50).tensors
    measure(model, x, y, SharpnessConfig(measures=("trace",), probes=6, bn_mode="batch"))
    measure(model, x, y, SharpnessConfig(measures=("trace",), probes=6))
    assert seen == [1024, None]  # batch statistics: 1024 (capped at N); eval mode: automatic


def test_shared_work_is_counted_once_on_the_first_measure_that_read_it():
    from flatcli import build_model

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, width=8)
    x, y = load_dataset("digits", samples=60).tensors
    names = ("frobenius", "lambda_min", "trace", "lambda_max", "trace_normalised", "density")
    config = SharpnessConfig(
        measures=names, probes=12, density_probes=2, density_iterations=6, max_iter=30
    )
    m = measure(model, x, y, config).measures
    # one Hutch++ run for trace and norm: on frobenius, asked for first
    assert m["frobenius"].hvps == 12 and m["trace"].hvps == m["trace_normalised"].hvps == 0
    assert m["frobenius"].shared_with == ("trace", "trace_normalised")
    assert m["trace"].shared_with == ("frobenius", "trace_normalised")
    # one Lanczos run for both ends: on lambda_min, asked for first; spectral_norm derived
    assert m["lambda_min"].hvps >= 3 and m["lambda_max"].hvps == m["spectral_norm"].hvps == 0
    assert m["lambda_min"].shared_with == ("lambda_max", "spectral_norm")
    assert m["spectral_norm"].shared_with == ("lambda_min", "lambda_max")
    assert m["density"].hvps == 12  # its own run: 2 probes, 6 steps
    # alone, a measure carries its run's cost and shares nothing
    alone = measure(model, x, y, replace(config, measures=("trace",)))
    trace = alone.measures["trace"]
    assert trace.shared_with == () and trace.hvps == alone.hvps == 12
    assert trace.value == m["trace"].value  # the same run
    alone = measure(model, x, y, replace(config, measures=("lambda_max",)))
    top = alone.measures["lambda_max"]
    assert top.shared_with == () and top.hvps >= alone.hvps >= 3  # (+ a float64 re-check)
