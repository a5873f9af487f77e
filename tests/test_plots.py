"""The figures (flatcli.report.plots): what each draws, on which axes, with which titles,
and that it is written; the reader of a run's epochs; the densities of compare --plot.

Each figure function returns a matplotlib Figure, inspected here before it is saved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pytest
from cli.fakes import run as fake_run  # tests/cli/fakes.py
from cli.fakes import sharpness_report

from flatcli.analysis.sharpness_report import Density, SharpnessReport
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import RunSummary, compare
from flatcli.config import DemoConfig, SharpnessConfig, make_train_config
from flatcli.curvature.results import Estimate
from flatcli.errors import CheckpointError, UsageError
from flatcli.report import plots
from flatcli.workflows.checkpoint import METRICS_FILE, MODEL_FILE
from flatcli.workflows.compare import run_densities
from flatcli.workflows.demo import DemoResult
from flatcli.workflows.training import EpochRecord, RunHistory, read_history, train

matplotlib.use("Agg")

PNG = b"\x89PNG\r\n\x1a\n"


def records(test_accuracies: list[float], lr: float = 0.05) -> list[EpochRecord]:
    """One epoch per test accuracy, the losses falling."""
    return [
        EpochRecord(i + 1, lr, 1.0 / (i + 1), 0.5 + i / 40, 0.9 / (i + 1), acc, 0.1)
        for i, acc in enumerate(test_accuracies)
    ]


def history(name: str, test_accuracies: list[float], **options: object) -> RunHistory:
    return RunHistory(name, records(test_accuracies), dict(options))


def gaussian_density(centre: float) -> Density:
    """A bump at ``centre`` whose tails fall to ~1e-300: what SLQ's broadening gives."""
    grid = [i / 10 for i in range(-50, 51)]
    return Density(grid, [math.exp(-((g - centre) ** 2) * 60) for g in grid])


def summary(name: str, gap_points: float, lambda_max: float, **measures: Estimate) -> RunSummary:
    """A run (tests/cli/fakes.py) with generalisation gap ``gap_points`` and lambda_max +- 10%."""
    return fake_run(
        name,
        1.0 - gap_points / 100,
        lambda_max,
        measures={"lambda_max": Estimate(lambda_max, 0.1 * lambda_max, "bound"), **measures},
        test_size=300,
    )


def sweep_rows() -> list[SweepRow]:
    return [
        SweepRow(
            scale=a,
            loss=0.5 / a,
            accuracy=0.9,
            weight_norm=2.0 * a,
            measures={
                "lambda_max": Estimate(1.0 / a, 1e-3, "bound"),
                "trace": Estimate(5.0 / a, 0.2, "stderr"),
            },
        )
        for a in (0.5, 1.0, 2.0, 4.0)
    ]


# --- training curves -------------------------------------------------------------------


def test_curves_draw_loss_and_accuracy_train_solid_test_dashed_and_the_learning_rate():
    runs = [history("a", [0.8, 0.9, 0.92]), history("b", [0.7, 0.8, 0.85])]
    fig = plots.curves_figure(runs)
    loss, accuracy, lr = fig.axes
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch"] * 3
    assert (loss.get_ylabel(), accuracy.get_ylabel(), lr.get_ylabel()) == (
        "loss",
        "accuracy (%)",
        "learning rate",
    )
    assert loss.get_yscale() == "log"
    assert len(loss.lines) == len(accuracy.lines) == 2 * len(runs)  # train and test per run
    assert [line.get_linestyle() for line in accuracy.lines] == ["-", "--", "-", "--"]
    assert len(lr.lines) == len(runs)
    assert list(accuracy.lines[1].get_ydata()) == pytest.approx([80, 90, 92])  # test, in %
    assert fig.get_suptitle() == "training curves: a, b"


def test_curves_without_a_recorded_learning_rate_have_no_learning_rate_panel():
    old = RunHistory("old", [EpochRecord(1, math.nan, 1, 0.5, 1, 0.5, math.nan)])
    assert [ax.get_ylabel() for ax in plots.curves_figure([old]).axes] == ["loss", "accuracy (%)"]


def test_the_legend_shows_a_test_accuracy_swing_over_the_last_epochs_and_the_settings():
    swinging = history(
        "cnn-sgd-l2",
        [0.5, 0.92, 0.97, 0.91, 0.96, 0.919, 0.95, 0.93, 0.97, 0.919],
        model="cnn",
        dataset="digits",
        optimizer="sgd",
        lr=0.05,
        l2=5e-3,
    )
    fig = plots.curves_figure([swinging])
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == [
        "cnn-sgd-l2: cnn, sgd lr 0.05, L2 0.005; test accuracy over the last 8 epochs 91.0%-97.0%",
        "train",
        "test",
    ]
    assert fig.get_suptitle() == "training curves: cnn-sgd-l2 on digits"


def test_settings_label_names_the_optimiser_and_what_is_not_default():
    assert plots.settings_label({"optimizer": "sgd", "lr": 0.05, "l2": 0.0}) == "sgd lr 0.05"
    assert (
        plots.settings_label(
            {"recipe": "gadam", "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.25}
            | {"average_from": 30, "schedule": "paper"}
        )
        == "gadam lr 0.01, wd 0.25, avg from 30, paper"
    )


# --- spectral densities ----------------------------------------------------------------


def report(density: Density) -> SharpnessReport:
    """The GGN density of runs/mlp-sgd measured on 300 training images."""
    return sharpness_report(
        checkpoint="runs/mlp-sgd/model.safetensors",
        num_samples=300,
        curvature="ggn",
        measures={"density": density},
    )


def test_a_density_is_drawn_down_to_a_fixed_fraction_of_its_peak_not_to_a_floor():
    density = gaussian_density(1.0)
    fig = plots.density_figure(density, report(density))
    (ax,) = fig.axes
    (line,) = ax.lines
    drawn = [v for v in line.get_ydata() if math.isfinite(v)]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "eigenvalue"
    assert min(drawn) >= max(density.values) * plots.DENSITY_RANGE
    assert len(drawn) < len(density.values)  # the tails are left out, not clipped to a line
    assert ax.get_ylabel() == "density (log; below 1e-06 of peak not drawn)"
    assert ax.get_title() == (
        "mlp-sgd: spectral density of the ggn\n300 train samples of digits, BN eval, float32"
    )


def test_spectra_overlay_each_run_beside_sharpness_against_the_gap():
    runs = compare([summary("sgd", 1.0, 2.0), summary("sgd-l2", 3.0, 5.0)]).runs
    densities = {"sgd": gaussian_density(0.5), "sgd-l2": gaussian_density(2.0)}
    fig = plots.spectra_figure(densities, runs, "hessian of all train samples")
    spectra, gap = fig.axes
    assert len(spectra.lines) == len(runs)
    assert [line.get_label() for line in spectra.lines] == ["sgd", "sgd-l2"]
    assert spectra.get_yscale() == "log"
    assert gap.get_xlabel() == "generalisation gap (train - test accuracy, points)"
    assert gap.get_ylabel() == plots.MEASURE_LABELS["lambda_max"]
    assert len(gap.containers) == len(runs)  # one error bar per run
    point, _, (bar,) = gap.containers[1].lines  # sgd-l2: gap 3 points, lambda_max 5 +- 0.5
    assert (list(point.get_xdata()), list(point.get_ydata())) == ([pytest.approx(3.0)], [5.0])
    assert [y for _, y in bar.get_segments()[0]] == pytest.approx([4.5, 5.5])
    assert (
        fig.get_suptitle() == "spectra and sharpness of sgd, sgd-l2\nhessian of all train samples"
    )


def test_measurement_label_says_what_matrix_on_which_samples():
    config = SharpnessConfig(samples=500, bn_mode="batch", density_probes=4, density_iterations=40)
    assert plots.measurement_label(config, slq=True) == (
        "hessian of 500 train samples, BN batch; SLQ 4 probes x 40 steps"
    )


# --- the weight-scaling sweep ------------------------------------------------------------


def test_the_sweep_is_drawn_on_log_log_axes_with_error_bars_and_the_accuracy_noted():
    rows = sweep_rows()
    fig = plots.sweep_figure(rows, "sweep of mlp-sgd")
    curvature, loss = fig.axes
    for ax in (curvature, loss):
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
        assert ax.get_xlabel() == "weight scale a"
    assert curvature.get_ylabel() == "curvature" and loss.get_ylabel() == "loss"
    assert len(curvature.containers) == 2 * len(rows)  # each measure, each factor
    assert [t.get_text() for t in curvature.get_legend().get_texts()] == [
        plots.MEASURE_LABELS["lambda_max"],
        "trace",
    ]
    assert [t.get_text() for t in loss.texts] == ["accuracy 90.0% at every a"]
    assert fig.get_suptitle() == "sweep of mlp-sgd"


def test_a_sweep_whose_accuracy_changes_says_its_range():
    rows = sweep_rows()
    rows[0] = SweepRow(0.5, 1.0, 0.8, 1.0, rows[0].measures)
    (note,) = plots.sweep_figure(rows, "t").axes[1].texts
    assert note.get_text() == "accuracy 80.0% to 90.0%"


# --- files -------------------------------------------------------------------------------


def test_a_figure_is_written_atomically_in_the_format_of_its_suffix(tmp_path):
    fig = plots.sweep_figure(sweep_rows(), "t")
    assert plots.save_figure(fig, tmp_path / "s.png").read_bytes()[:8] == PNG
    assert plots.save_figure(fig, tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "s.svg"]  # no temporary left


def test_a_figure_that_fails_to_render_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "s.png"
    target.write_bytes(b"old")
    fig = plots.sweep_figure(sweep_rows(), "t")
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        plots.save_figure(fig, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["s.png"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("x.nope", "--plot {path}: unknown image format .nope (use one of: "),
        ("x", "--plot {path}: unknown image format (none)"),
        (
            "missing/x.png",
            "--plot {path}: the folder {tmp}/missing does not exist (create it first)",
        ),
        ("", "--plot {path} is a folder (give a file name, e.g. plot.png)"),
    ],
)
def test_a_figure_path_that_cannot_be_written_is_refused(tmp_path, name, message):
    path = tmp_path / name
    with pytest.raises(UsageError) as caught:
        plots.check_plot_path(path)
    assert str(caught.value).startswith(message.format(path=path, tmp=tmp_path))


# --- the demo's figures ------------------------------------------------------------------


def demo_result(folder: Path) -> DemoResult:
    """Two models, three variants each: the runs of the demo's contrasts."""
    comparisons = {}
    for model, base in (("logreg", 1.0), ("mlp", 3.0)):
        sgd = summary(
            f"{model}-sgd", 2.0, base, lambda_max_normalised=Estimate(9 * base, 1, "bound")
        )
        for variant, title in (("sgd-l2", "L2 regularisation"), ("gadam", "Gadam vs SGD")):
            other = summary(
                f"{model}-{variant}",
                1.0,
                2 * base,
                lambda_max_normalised=Estimate(base, 1, "bound"),
            )
            comparisons[(model, title)] = compare([sgd, other])
    config = DemoConfig(models=("logreg", "mlp"), epochs=3, out=folder)
    return DemoResult(
        config=config,
        comparisons=comparisons,
        ranks={},
        sweep_model="logreg",
        sweep=sweep_rows(),
        claims=[],
        runs={
            f"{m}-{v}": folder / f"{m}-{v}"
            for m in config.models
            for v in ("sgd", "sgd-l2", "gadam")
        },
    )


def test_the_demo_scatter_has_a_colour_per_variant_and_a_marker_per_model(tmp_path):
    fig = plots.demo_gap_figure(demo_result(tmp_path))
    raw, scaled = fig.axes
    assert raw.get_ylabel() == plots.MEASURE_LABELS["lambda_max"]
    assert scaled.get_ylabel() == plots.MEASURE_LABELS["lambda_max_normalised"]
    assert len(raw.containers) == 6  # six runs, sgd once per model
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["sgd", "sgd-l2", "gadam", "logreg", "mlp"]
    points = [(c.lines[0].get_color(), c.lines[0].get_marker()) for c in raw.containers]
    assert len(set(points)) == 6
    assert {colour for colour, _ in points} == {"C0", "C1", "C2"}
    assert {marker for _, marker in points} == {"o", "s"}
    assert fig.get_suptitle().startswith("sharpness against generalisation gap: digits, 6 runs")


def test_demo_arms_are_read_from_run_names_with_or_without_a_seed():
    config = DemoConfig(models=("mlp", "cnn"))
    assert plots.demo_arm("mlp-sgd-l2", config) == ("mlp", "sgd-l2")
    assert plots.demo_arm("cnn-gadam-s3", config) == ("cnn", "gadam")
    assert plots.demo_arm("mlp-adam", config) is None


def test_demo_figures_writes_each_figure_into_the_folder(tmp_path):
    result = demo_result(tmp_path)
    histories = {name: history(name, [0.5, 0.8, 0.9]) for name in result.runs}
    densities = {name: gaussian_density(i / 3) for i, name in enumerate(result.runs)}
    written = plots.demo_figures(result, tmp_path, histories, densities, "SLQ 4 probes")
    assert [p.name for p in written] == [
        "sharpness-gap.png",
        "sweep.png",
        "spectra.png",
        "curves-logreg.png",
        "curves-mlp.png",
    ]
    assert all(p.parent == tmp_path and p.read_bytes()[:8] == PNG for p in written)
    spectra = plots.demo_spectra_figure(result, densities, "SLQ 4 probes")
    assert [ax.get_title() for ax in spectra.axes] == ["logreg", "mlp"]
    assert [len(ax.lines) for ax in spectra.axes] == [3, 3]


def test_without_histories_or_densities_the_demo_draws_the_scatter_and_the_sweep(tmp_path):
    written = plots.demo_figures(demo_result(tmp_path), tmp_path)
    assert [p.name for p in written] == ["sharpness-gap.png", "sweep.png"]


# --- reading a run's epochs; the densities of compare --plot --------------------------------


def write_run(folder: Path, rows: list[dict[str, object]]) -> Path:
    folder.mkdir()
    (folder / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_read_history_gives_the_epochs_of_metrics_jsonl(tmp_path):
    rows = [r.__dict__ for r in records([0.5, 0.7])]
    got = read_history(write_run(tmp_path / "run", rows))
    assert got == RunHistory("run", records([0.5, 0.7]), {})


def test_rows_written_before_the_learning_rate_was_recorded_read_as_nan(tmp_path):
    row = {k: v for k, v in records([0.5])[0].__dict__.items() if k not in ("lr", "seconds")}
    (got,) = read_history(write_run(tmp_path / "run", [row])).records
    assert math.isnan(got.lr) and math.isnan(got.seconds) and got.test_accuracy == 0.5


def test_read_history_refuses_what_is_not_a_run_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / MODEL_FILE).write_bytes(b"")
    write_run(tmp_path / "bad", [{"epoch": 1}])
    cases = {
        "missing": "missing does not exist",
        "empty": "empty is not a run folder (no model.safetensors or metrics.jsonl)",
        "unfinished": "unfinished has no metrics.jsonl",
        "bad": "metrics.jsonl line 1 is not an epoch's record",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError) as caught:
            read_history(tmp_path / name)
        assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny logistic regressions on digits (one epoch, 200 images)."""
    folder = tmp_path_factory.mktemp("runs")
    base = dict(dataset="digits", model="logreg", epochs=1, train_samples=200, device="cpu")
    for name, lr in (("slow", 0.01), ("fast", 0.1)):
        train(make_train_config(out=folder / name, lr=lr, **base))
    return [folder / "slow", folder / "fast"]


def test_run_densities_are_keyed_by_run_name_and_cached(two_runs):
    config = SharpnessConfig(samples=100, density_probes=2, density_iterations=8)
    first = run_densities(two_runs, config)
    assert list(first) == ["slow", "fast"]
    assert all(isinstance(d, Density) and len(d.grid) == len(d.values) > 0 for d in first.values())
    again = run_densities(two_runs, config)  # from the cache: no product spent
    assert [(d.grid, d.values, d.hvps) for d in again.values()] == [
        (d.grid, d.values, 0) for d in first.values()
    ]
