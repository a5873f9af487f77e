"""``flatcli sharpness``: the config and loading options handed to the library, what is
printed and written, and bad options refused before anything is measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flatcli.analysis.sharpness_report import LayerReport
from flatcli.analysis.sweep import SweepRow
from flatcli.cli.progress import ProgressDisplay
from flatcli.config import SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.report.csv import density_csv
from flatcli.report.tables import density_histogram, layers_table, sharpness_table, sweep_table
from flatcli.report.text import sharpness_as_dict
from flatcli.workflows.source import CheckpointSource

from .fakes import DENSITY, LAMBDA_MAX
from .fakes import sharpness_report as report
from .helpers import invoke, one_line_error, rendered


@pytest.fixture
def measured(spy):
    return spy("flatcli.workflows.sharpness", "checkpoint_sharpness", report())


def test_no_options_measure_the_default_config_of_the_checkpoint(measured):
    result = invoke("sharpness", "run")
    assert result.exit_code == 0, result.stderr
    args, kwargs = measured.one
    assert args == (Path("run"), SharpnessConfig(), CheckpointSource(factory_args={}))
    progress, status = kwargs.pop("progress"), kwargs.pop("status")
    assert callable(progress) and callable(status)
    assert kwargs == {"use_cache": True}


def test_every_option_reaches_the_config_and_the_loader(measured):
    result = invoke(
        "sharpness",
        "run",
        *("--measures", "lambda_max, trace,density", "--split", "test", "--samples", 100),
        *("--batch-size", 50, "--memory-gb", 0.5, "--curvature", "ggn", "--bn-mode", "batch"),
        *("--include-l2", "--exact", "--tol", 1e-3, "--max-iter", 30, "--probes", 20),
        *("--target-stderr", 0.05, "--rho", 0.1, "--logit-normalise", "--seed", 7),
        *("--dtype", "float64", "--device", "cpu", "--per-layer", "--data-dir", "d"),
        *("--dataset", "mnist", "--model-factory", "m.py:make", "--factory-arg", "num_classes=3"),
        *("--factory-arg", "name=x", "--output", "logits", "--no-cache"),
    )
    assert result.exit_code == 0, result.stderr
    args, kwargs = measured.one
    assert args == (
        Path("run"),
        SharpnessConfig(
            measures=("lambda_max", "trace", "density"),
            split="test",
            samples=100,
            batch_size=50,
            memory_gb=0.5,
            curvature="ggn",
            bn_mode="batch",
            include_l2=True,
            exact=True,
            tol=1e-3,
            max_iter=30,
            probes=20,
            target_stderr=0.05,
            rho=0.1,
            logit_normalise=True,
            seed=7,
            dtype="float64",
            per_layer=True,
        ),
        CheckpointSource(
            dataset="mnist",
            data_dir="d",
            device="cpu",
            model_factory="m.py:make",
            factory_args={"num_classes": 3, "name": "x"},
            output="logits",
        ),
    )
    assert {k: v for k, v in kwargs.items() if k not in ("progress", "status")} == {
        "use_cache": False,
    }


def test_json_is_the_report_document(measured):
    result = invoke("sharpness", "run", "--json")
    assert result.exit_code == 0, result.stderr
    doc, expected = json.loads(result.stdout), json.loads(json.dumps(sharpness_as_dict(report())))
    assert doc.pop("provenance")["device"] == expected.pop("provenance")["device"]
    assert doc == expected and doc["command"] == "sharpness"


def test_tables_and_histogram_are_printed(measured, screen):
    console = screen("flatcli.cli.sharpness")
    assert invoke("sharpness", "run").exit_code == 0
    assert console.export_text() == rendered(sharpness_table(report()), density_histogram(DENSITY))


def test_the_measures_table_at_100_columns():
    assert rendered(sharpness_table(report())) == (
        "hessian of the mean cross-entropy on digits (train, N=200, P=650, BatchNorm   \n"
        "eval, float32, cpu)                                                           \n"
        "┏━━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━┓\n"
        "┃ measure        ┃  value ┃                  uncertainty ┃              HVPs ┃\n"
        "┡━━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━┩\n"
        "│ loss           │   1.25 │                              │                   │\n"
        "│ accuracy       │ 87.50% │                              │                   │\n"
        "│ ||w||          │    3.5 │                              │                   │\n"
        "│ lambda_max     │    1.5 │             <= 0.001 (bound) │                 8 │\n"
        "│ lambda_min     │  -0.25 │ not converged (residual 0.5) │ (with lambda_max) │\n"
        "│ trace          │     13 │                ± 0.04 (s.e.) │                99 │\n"
        "│ Frobenius norm │   3.25 │              ± 0.0003 (s.e.) │      (with trace) │\n"
        "└────────────────┴────────┴──────────────────────────────┴───────────────────┘\n"
        "                    107 Hessian-vector products in 1.50 s                     \n"
    )


def test_an_exact_value_and_the_coupled_l2_are_shown():
    exact = report(l2=5e-4, measures={"trace": Estimate(value=2.0, uncertainty=0.0, kind="exact")})
    text = rendered(sharpness_table(exact))
    assert "eval, float32, cpu, + l2 I = 0.0005)" in text
    assert "│ trace    │      2 │       exact │      │" in text


def test_per_layer_table_and_histogram_at_100_columns():
    layers = [LayerReport("fc", ("fc.weight", "fc.bias"), 650, {"lambda_max": LAMBDA_MAX})]
    assert rendered(layers_table(report(layers=layers))) == (
        "per layer (diagonal blocks of  \n"
        "the matrix)                    \n"
        "┏━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━┓\n"
        "┃ layer ┃ params ┃ lambda_max ┃\n"
        "┡━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━┩\n"
        "│ fc    │    650 │        1.5 │\n"
        "└───────┴────────┴────────────┘\n"
    )
    assert density_histogram(DENSITY, bins=3, width=10) == (
        "eigenvalue interval            mass (log scale)\n"
        "[         -1,           0)  #########  2.5e-01\n"
        "[          0,           1)  #########  5.0e-01\n"
        "[          1,           2)  #########  2.5e-01"
    )


def test_a_missed_target_stderr_is_a_note_on_stderr(spy):
    spy("flatcli.workflows.sharpness", "checkpoint_sharpness", report())
    result = invoke("sharpness", "run", "--target-stderr", 0.001, "--probes", 20, "--json")
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "note: trace reached a relative standard error of 0.00308, not 0.001: the budget of 10 x "
        "--probes = 200 products ran out; raise --probes"
    ]
    json.loads(result.stdout)  # still one document


def test_the_density_is_written_as_csv_and_drawn(measured, tmp_path):
    csv, png = tmp_path / "d.csv", tmp_path / "d.png"
    args = ("--measures", "density", "--density-out", csv, "--plot", png)
    result = invoke("sharpness", "run", *args)
    assert result.exit_code == 0, result.stderr
    assert (
        csv.read_text()
        == density_csv(DENSITY)
        == ("eigenvalue,density\n-1.0,0.0\n0.0,0.5\n1.0,0.5\n2.0,0.0\n")
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_plot_is_one_line_with_the_install_hint(measured, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = invoke("sharpness", "run", "--measures", "density", "--plot", tmp_path / "d.png")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --plot needs matplotlib (pip install 'flatcli[plot]')")
    assert not (tmp_path / "d.png").exists()


def test_scale_runs_the_sweep_on_the_loaded_point(spy, screen):
    point = SimpleNamespace(model="model", inputs="x", targets="y")
    rows = [
        SweepRow(
            scale=2.0, loss=0.5, accuracy=0.9, weight_norm=7.0, measures={"lambda_max": LAMBDA_MAX}
        )
    ]
    load = spy("flatcli.workflows.sharpness", "load_point", point)
    sweep = spy("flatcli.analysis.sweep", "scaling_sweep", rows)
    console = screen("flatcli.cli.sharpness")
    result = invoke(
        "sharpness",
        "run",
        "--scale",
        "0.5,2",
        "--scale-layer",
        "last",
        "--samples",
        10,
        "-d",
        "mnist",
    )
    assert result.exit_code == 0, result.stderr
    assert load.one == (
        (Path("run"), CheckpointSource(dataset="mnist", factory_args={})),
        {"split": "train", "samples": 10},
    )
    assert isinstance(sweep.one[1].pop("progress"), ProgressDisplay)
    assert sweep.one == (
        ("model", "x", "y", (0.5, 2.0), SharpnessConfig(samples=10)),
        {"layers": "last"},
    )
    assert console.export_text() == rendered(sweep_table(rows, "last"))
    assert rendered(sweep_table(rows, "last")) == (
        "weights of the last layer multiplied by a   \n"
        "┏━━━┳━━━━━━━┳━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━━━┓\n"
        "┃ a ┃ ||w|| ┃ loss ┃ accuracy ┃ lambda_max ┃\n"
        "┡━━━╇━━━━━━━╇━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━━━┩\n"
        "│ 2 │     7 │  0.5 │   90.00% │        1.5 │\n"
        "└───┴───────┴──────┴──────────┴────────────┘\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--measures", "nope"], "unknown measure nope"),
        (["--tol", "2"], "tol must lie in (0, 1)"),
        (["--factory-arg", "3"], "--factory-arg '3' is not KEY=VALUE"),
        (["--plot", "d.png"], "--plot and --density-out need 'density' in --measures"),
        (
            ["--scale", "2", "--density-out", "d.csv"],
            "--density-out does not apply to a --scale sweep",
        ),
        (["--scale", "x"], "--scale 'x' is not a comma-separated list of numbers"),
        (["--measures", "density", "--density-out", "."], "--density-out . is a folder"),
        (["--measures", "density", "--plot", "d.nope"], "unknown image format .nope"),
    ],
)
def test_bad_options_are_one_line_and_measure_nothing(spy, args, message):
    measured = spy("flatcli.workflows.sharpness", "checkpoint_sharpness", report())
    loaded = spy("flatcli.workflows.sharpness", "load_point")
    one_line_error(invoke("sharpness", "run", *args), 2, message)
    assert measured.calls == [] and loaded.calls == []
