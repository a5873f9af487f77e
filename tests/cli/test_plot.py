"""Figures from the command line: ``flatcli plot``, ``train --plot``, ``sharpness --scale
--plot``, ``compare --plot`` and the demo's figures; each refusal one line, before anything
is trained or measured; without matplotlib one line saying how to get it.

The workflows are replaced by recorders (``spy``) returning fixed results; the figures
are drawn for real (Agg) and caught on their way to the file (``drawn``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest

from flatcli.analysis.sharpness_report import Density
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import compare
from flatcli.cli import demo as demo_cli
from flatcli.config import DemoConfig
from flatcli.curvature.results import Estimate
from flatcli.report import plots
from flatcli.workflows.checkpoint import METRICS_FILE, MODEL_FILE
from flatcli.workflows.demo import DemoResult, run_demo
from flatcli.workflows.training import EpochRecord, TrainResult

from .fakes import run
from .helpers import invoke, one_line_error

matplotlib.use("Agg")

PNG = b"\x89PNG\r\n\x1a\n"
NO_MATPLOTLIB = "error: --plot needs matplotlib (pip install 'flatcli[plot]')"


def epochs(*test_accuracies: float) -> list[EpochRecord]:
    return [
        EpochRecord(i + 1, 0.05, 1.0 / (i + 1), 0.5 + i / 20, 1.0 / (i + 1), acc, 0.2)
        for i, acc in enumerate(test_accuracies)
    ]


def write_run(folder: Path, *test_accuracies: float) -> Path:
    """A run folder as flatcli train leaves it after its epochs (metrics.jsonl)."""
    folder.mkdir(parents=True)
    rows = epochs(*test_accuracies)
    (folder / METRICS_FILE).write_text("".join(json.dumps(r.__dict__) + "\n" for r in rows))
    return folder


@pytest.fixture
def drawn(monkeypatch) -> list[tuple[object, Path]]:
    """Every (figure, path) saved, in order; the files are written as usual."""
    saved: list[tuple[object, Path]] = []
    save = plots.save_figure

    def record(fig, path):
        saved.append((fig, path))
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", record)
    return saved


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError


# --- flatcli plot ----------------------------------------------------------------------


def test_plot_overlays_the_curves_of_several_runs_in_the_file_given(tmp_path, drawn):
    a, b = write_run(tmp_path / "a", 0.8, 0.9), write_run(tmp_path / "b", 0.7, 0.75)
    result = invoke("plot", a, b, "--out", tmp_path / "curves.svg")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"training curves of 2 run(s): {tmp_path / 'curves.svg'}\n"
    ((fig, path),) = drawn
    assert path == tmp_path / "curves.svg" and path.read_text().lstrip().startswith("<?xml")
    loss, accuracy, _ = fig.axes
    assert len(loss.lines) == len(accuracy.lines) == 4
    assert fig.get_suptitle() == "training curves: a, b"


def test_plot_of_one_run_writes_curves_png_in_its_folder(tmp_path):
    folder = write_run(tmp_path / "run", 0.8, 0.9)
    result = invoke("plot", folder)
    assert result.exit_code == 0, result.stderr
    assert (folder / "curves.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["a", "b"], 2, "2 runs need --out (e.g. --out curves.png)"),
        (["missing"], 1, "missing does not exist"),
        (["empty"], 1, "empty is not a run folder"),
        (["unfinished"], 1, "unfinished has no metrics.jsonl"),
        (["a", "--out", "x.nope"], 2, "--out x.nope: unknown image format .nope"),
        (["a", "--out", "no/x.png"], 2, "--out no/x.png: the folder no does not exist"),
    ],
)
def test_plot_refuses_bad_input_with_one_line(tmp_path, args, code, message):
    write_run(tmp_path / "a", 0.8)
    write_run(tmp_path / "b", 0.8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / MODEL_FILE).write_bytes(b"")
    one_line_error(invoke("plot", *args), code, message)
    assert not list(tmp_path.rglob("*.png"))


def test_plot_without_matplotlib_is_one_line(tmp_path, no_matplotlib):
    folder = write_run(tmp_path / "run", 0.8)
    result = invoke("plot", folder)
    assert result.exit_code == 2 and result.stderr.strip() == NO_MATPLOTLIB
    assert not (folder / "curves.png").exists()


def test_plot_help_shows_an_example_and_its_output_option():
    result = invoke("plot", "-h")
    assert result.exit_code == 0, result.stderr
    assert "Example: flatcli plot runs/mlp-sgd runs/mlp-sgd-l2 --out curves.png" in result.stdout
    assert re.findall(r"╭─ (.+?) ─", result.stdout) == ["Arguments", "Options", "Output"]


# --- train --plot ----------------------------------------------------------------------


@pytest.fixture
def trained(spy, tmp_path):
    folder = tmp_path / "run"
    result = TrainResult(folder, folder / MODEL_FILE, {"test_accuracy": 0.9}, epochs(0.8, 0.9))
    return spy("flatcli.workflows.training", "train", result)


def test_train_plot_draws_the_runs_curves_after_training_and_says_where(trained, drawn):
    result = invoke("train", "-m", "mlp", "--lr", 0.1, "--out", "run", "--plot", "c.png")
    assert result.exit_code == 0, result.stderr
    assert len(trained.calls) == 1
    assert result.stderr.splitlines()[-1] == "training curves: c.png"
    ((fig, path),) = drawn
    assert path == Path("c.png") and path.read_bytes()[:8] == PNG
    (legend,) = fig.legends
    assert legend.get_texts()[0].get_text().startswith("run: mlp, sgd lr 0.1; test accuracy")


@pytest.mark.parametrize(
    "target, message",
    [("c.nope", "unknown image format .nope"), ("no/c.png", "the folder no does not exist")],
)
def test_train_plot_to_a_file_that_cannot_be_written_is_refused_before_training(
    trained, target, message
):
    one_line_error(invoke("train", "--plot", target), 2, f"--plot {target}", message)
    assert trained.calls == []


def test_train_plot_without_matplotlib_is_one_line_before_training(trained, no_matplotlib):
    result = invoke("train", "--plot", "c.png")
    assert result.exit_code == 2 and result.stderr.strip() == NO_MATPLOTLIB
    assert trained.calls == []


# --- sharpness --scale --plot ------------------------------------------------------------

ROWS = [
    SweepRow(a, 0.5 / a, 0.9, 2.0 * a, {"lambda_max": Estimate(1.0 / a, 1e-3, "bound")})
    for a in (0.5, 1.0, 2.0)
]


@pytest.fixture
def sweep(spy):
    point = SimpleNamespace(model="model", inputs="x", targets=[0] * 300)
    loaded = spy("flatcli.workflows.sharpness", "load_point", point)
    return loaded, spy("flatcli.analysis.sweep", "scaling_sweep", ROWS)


def test_a_sweep_is_drawn_after_its_table(sweep, drawn):
    result = invoke("sharpness", "runs/mlp", "--scale", "0.5,1,2", "--plot", "sweep.png")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "sweep figure: sweep.png\n"
    ((fig, path),) = drawn
    assert Path("sweep.png").read_bytes()[:8] == PNG
    curvature, loss = fig.axes
    assert (curvature.get_xscale(), curvature.get_yscale()) == ("log", "log")
    assert len(curvature.containers) == len(ROWS)
    assert fig.get_suptitle() == (
        "weight-scaling sweep of mlp (all layers scaled)\nhessian of 300 train samples"
    )


def test_a_sweep_with_json_is_drawn_too(sweep, drawn):
    result = invoke("sharpness", "run", "--scale", "0.5,1,2", "--plot", "s.png", "--json")
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)  # stdout stays one document
    assert len(drawn) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plot", "s.nope"], "--plot s.nope: unknown image format .nope"),
        (["--plot", "no/s.png"], "--plot no/s.png: the folder no does not exist"),
        (["--density-out", "d.csv"], "--density-out does not apply to a --scale sweep"),
    ],
)
def test_a_sweep_plot_that_cannot_be_written_is_refused_before_measuring(sweep, args, message):
    one_line_error(invoke("sharpness", "run", "--scale", "1,2", *args), 2, message)
    assert [calls.calls for calls in sweep] == [[], []]


def test_a_sweep_plot_without_matplotlib_is_one_line(sweep, no_matplotlib):
    result = invoke("sharpness", "run", "--scale", "1,2", "--plot", "s.png")
    assert result.exit_code == 2 and result.stderr.strip() == NO_MATPLOTLIB
    assert [calls.calls for calls in sweep] == [[], []]


# --- compare --plot ---------------------------------------------------------------------

COMPARISON = compare([run("sgd", 0.8, 2.0), run("sgd-l2", 0.9, 4.0)])
DENSITIES = {
    "sgd": Density([0.0, 1.0, 2.0], [0.5, 0.4, 1e-9]),
    "sgd-l2": Density([0.0, 2.0, 4.0], [0.5, 0.2, 0.1]),
}


@pytest.fixture
def compared(spy):
    return (
        spy("flatcli.workflows.compare", "compare_checkpoints", COMPARISON),
        spy("flatcli.workflows.compare", "run_densities", DENSITIES),
    )


def test_compare_plot_measures_the_densities_and_draws_them_beside_sharpness_and_gap(
    compared, drawn
):
    result = invoke("compare", "sgd", "sgd-l2", "--plot", "spectra.png", "--samples", 100)
    assert result.exit_code == 0, result.stderr
    args, kwargs = compared[1].one
    assert args[0] == [Path("sgd"), Path("sgd-l2")] and kwargs["use_cache"] is True
    assert args[1] == compared[0].one[0][1]  # the settings the runs were compared with
    assert args[1].samples == 100
    assert result.stderr.splitlines()[-1] == "spectra figure: spectra.png"
    ((fig, path),) = drawn
    assert path.read_bytes()[:8] == PNG
    spectra, gap = fig.axes
    assert len(spectra.lines) == 2 and gap.get_xlabel().startswith("generalisation gap")
    assert fig.get_suptitle().startswith("spectra and sharpness of sgd, sgd-l2\nhessian of 100")


def test_compare_without_plot_measures_no_density(compared):
    assert invoke("compare", "a", "b").exit_code == 0
    assert compared[1].calls == []


@pytest.mark.parametrize(
    "target, message",
    [("s.nope", "unknown image format .nope"), ("no/s.png", "the folder no does not exist")],
)
def test_compare_plot_that_cannot_be_written_is_refused_before_measuring(compared, target, message):
    one_line_error(invoke("compare", "a", "b", "--plot", target), 2, f"--plot {target}", message)
    assert [calls.calls for calls in compared] == [[], []]


def test_compare_plot_without_matplotlib_is_one_line(compared, no_matplotlib):
    result = invoke("compare", "a", "b", "--plot", "s.png")
    assert result.exit_code == 2 and result.stderr.strip() == NO_MATPLOTLIB
    assert [calls.calls for calls in compared] == [[], []]


# --- the demo's figures ------------------------------------------------------------------


@pytest.fixture
def demo(spy, tmp_path):
    """A demo of one model whose two runs exist (their epochs only)."""
    folder = tmp_path / "demo"
    runs = {name: write_run(folder / name, 0.8, 0.9) for name in ("logreg-sgd", "logreg-sgd-l2")}
    result = DemoResult(
        config=DemoConfig(models=("logreg",), out=folder),
        comparisons={
            ("logreg", "L2 regularisation"): compare(
                [run("logreg-sgd", 0.8, 2.0), run("logreg-sgd-l2", 0.9, 4.0)]
            )
        },
        ranks={},
        sweep_model="logreg",
        sweep=ROWS,
        claims=[],
        runs=runs,
    )
    spy("flatcli.workflows.demo", "run_demo", result)
    densities = {"logreg-sgd": DENSITIES["sgd"], "logreg-sgd-l2": DENSITIES["sgd-l2"]}
    return folder, spy("flatcli.workflows.compare", "run_densities", densities)


def test_the_demo_writes_its_figures_into_its_folder_and_names_them(demo):
    folder, densities = demo
    result = invoke("demo", "--out", folder, "--json")
    assert result.exit_code == 0, result.stderr
    names = ["sharpness-gap.png", "sweep.png", "spectra.png", "curves-logreg.png"]
    assert result.stderr.splitlines()[-1] == f"figures in {folder}: {', '.join(names)}"
    assert all((folder / name).read_bytes()[:8] == PNG for name in names)
    ((args, _),) = densities.calls
    assert args[0] == [folder / "logreg-sgd", folder / "logreg-sgd-l2"]
    assert args[1].measures == ("density",) and args[1].density_probes == 4
    json.loads(result.stdout)  # stdout stays one document


def test_no_plots_writes_no_figure(demo):
    folder, densities = demo
    result = invoke("demo", "--out", folder, "--no-plots")
    assert result.exit_code == 0, result.stderr
    assert not list(folder.glob("*.png")) and densities.calls == []
    assert "figures" not in result.stderr


def test_without_matplotlib_the_demo_says_figures_were_skipped_and_succeeds(demo, no_matplotlib):
    folder, densities = demo
    result = invoke("demo", "--out", folder)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "figures skipped: matplotlib is not installed (pip install 'flatcli[plot]'; "
        "--no-plots leaves them out)"
    )
    assert not list(folder.glob("*.png")) and densities.calls == []


def test_a_figure_that_cannot_be_drawn_is_a_warning_after_the_demo(demo):
    folder, _ = demo
    (folder / "logreg-sgd" / METRICS_FILE).unlink()
    (folder / "logreg-sgd" / MODEL_FILE).write_bytes(b"")  # a run, but without its epochs
    result = invoke("demo", "--out", folder)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[-1].startswith("warning: figures not written: ")
    assert "logreg-sgd has no metrics.jsonl" in result.stderr


@pytest.mark.slow
def test_the_figures_of_a_reduced_demo_are_drawn_from_its_real_runs(tmp_path):
    config = DemoConfig.reduced(out=tmp_path / "demo", device="cpu", models=("logreg",))
    demo_cli._write_figures(run_demo(config))
    names = ["sharpness-gap.png", "sweep.png", "spectra.png", "curves-logreg.png"]
    assert sorted(p.name for p in (tmp_path / "demo").glob("*.png")) == sorted(names)
    assert all((tmp_path / "demo" / name).stat().st_size > 10_000 for name in names)
