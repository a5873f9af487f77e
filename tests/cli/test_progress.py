"""Progress on stderr (issue 11): plain lines in a log, bars with totals and ETA on a
terminal, totals equal to the work done, nothing claimed that was skipped.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from flatcli import build_model, save_checkpoint
from flatcli.analysis.progress import Task, Tick, cache_note
from flatcli.cli.progress import INTERVAL_ENV, PREFIX, ProgressDisplay
from flatcli.errors import RunExistsError, UsageError
from flatcli.workflows.demo import ensure_run, existing_run
from flatcli.workflows.training import EpochRecord, TrainCallbacks, train

from .helpers import invoke

DIGITS = {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]}
#: What a bar or a spinner draws: none of it may reach a log.
BAR_CHARACTERS = "━╸╺⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def make_run(folder: Path, arch: str = "logreg", **kwargs: int) -> Path:
    """An untrained checkpoint on digits (no training needed to measure it)."""
    torch.manual_seed(0)
    model = build_model(arch, input_shape=(1, 8, 8), num_classes=10, **kwargs)
    save_checkpoint(
        folder / "model.safetensors",
        model,
        {"arch": {"name": arch, "kwargs": kwargs}, "dataset": DIGITS, "train": {"l2": 0.0}},
    )
    return folder


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(PREFIX)]


def final_line(stderr: str, task: str) -> str:
    lines = [line for line in progress_lines(stderr) if line.startswith(f"{PREFIX}{task} ")]
    assert lines, stderr
    return lines[-1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain_display(clock: FakeClock, **kwargs: float) -> tuple[ProgressDisplay, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    assert not console.is_terminal
    return ProgressDisplay(console, clock=clock, **kwargs), buffer


# -- without a terminal: plain lines ---------------------------------------------------


def test_train_in_a_log_writes_one_plain_line_per_epoch_and_no_bars(tmp_path):
    result = invoke(
        "train",
        *("--model", "logreg", "--epochs", 3, "--train-samples", 200),
        *("--out", tmp_path / "run", "--json"),
    )
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)  # stdout stays one JSON document
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert all(" train " in line and " test " in line and " lr " in line for line in epochs)
    assert final_line(result.stderr, "training").startswith(f"{PREFIX}training 3/3 epochs, ")
    assert "\x1b" not in result.stderr
    assert not set(BAR_CHARACTERS) & set(result.stderr)


class Interrupt(Exception):
    pass


def stop_after_epoch_1(record: EpochRecord) -> None:
    raise Interrupt


def test_a_resumed_run_says_first_from_which_epoch_it_resumes(tmp_path, make_config):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(make_config(out=out, train_samples=100), TrainCallbacks(on_epoch=stop_after_epoch_1))
    result = invoke("train", "--out", out, "--resume")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"resuming {out} at epoch 2/2"), result.stderr
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["2/2"]


def test_exact_sharpness_reports_a_total_equal_to_the_products_it_makes(tmp_path):
    run = make_run(tmp_path / "run", "mlp", width=4)  # P = 64*4 + 4 + 4*10 + 10 = 310
    result = invoke("sharpness", run, "--exact", "--samples", 100, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)  # the progress went to stderr
    line = final_line(result.stderr, "exact spectrum")
    done, total = map(int, re.search(r"exact spectrum (\d+)/(\d+) HVPs", line).groups())
    assert done == total == document["hvps"] == 310


def test_lanczos_that_stops_early_says_how_many_steps_of_up_to_max_iter(tmp_path):
    run = make_run(tmp_path / "run")
    result = invoke("sharpness", run, "--measures", "lambda_max", "--samples", 100, "--json")
    assert result.exit_code == 0, result.stderr
    line = final_line(result.stderr, "lambda_max")
    steps = int(re.search(r"lambda_max (\d+) Lanczos steps \(of up to 100\)", line).group(1))
    assert steps < 100


def test_a_scale_sweep_counts_its_points(tmp_path):
    run = make_run(tmp_path / "run")
    result = invoke(
        "sharpness", run, "--scale", "1,2", "--measures", "lambda_max", "--samples", 100, "--json"
    )
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    assert final_line(result.stderr, "scale sweep").startswith(f"{PREFIX}scale sweep 2/2 points, ")
    assert final_line(result.stderr, "scale 2: lambda_max")


def test_compare_says_cached_for_a_run_measured_before_and_measures_nothing_for_it(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", "mlp", width=4)
    args = ("compare", a, b, "--measures", "lambda_max", "--samples", 100, "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    assert "(measured)" in final_line(first.stderr, "a: sharpness")
    assert final_line(first.stderr, "comparing").startswith(f"{PREFIX}comparing 2/2 runs, ")
    again = invoke(*args)
    assert again.exit_code == 0, again.stderr
    json.loads(again.stdout)
    assert "(cached)" in final_line(again.stderr, "a: sharpness")
    assert "(cached)" in final_line(again.stderr, "b: sharpness")
    assert not [line for line in progress_lines(again.stderr) if "lambda_max" in line]


def test_rank_bound_counts_the_products_of_both_dense_matrices(tmp_path):
    run = make_run(tmp_path / "run")  # logreg: P = 650
    result = invoke("rank-bound", run, "--samples", 50, "--json")
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    for matrix in ("hessian", "ggn"):
        assert final_line(result.stderr, f"dense {matrix}").startswith(
            f"{PREFIX}dense {matrix} 650/650 HVPs, "
        )


def test_a_demo_rerun_reuses_every_run_and_trains_none(tmp_path):
    args = ("demo", "--models", "logreg", "--epochs", 1, "--train-samples", 100)
    args += ("--samples", 50, "--no-plots", "--out", tmp_path / "demo", "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    assert "training logreg-sgd" in first.stderr.splitlines()
    epochs = final_line(first.stderr, "training logreg-sgd")  # each run's epochs are shown
    assert epochs.startswith(f"{PREFIX}training logreg-sgd 1/1 epochs, ")
    again = invoke(*args)
    assert again.exit_code == 0, again.stderr
    json.loads(again.stdout)  # one document: the stage lines went to stderr
    lines = again.stderr.splitlines()
    for run in ("logreg-sgd", "logreg-sgd-l2", "logreg-gadam"):
        assert f"reusing {run} (trained before)" in lines
    assert not [line for line in lines if "training" in line], again.stderr
    assert "logreg-sgd: sharpness cached, logreg-sgd-l2: sharpness cached" in lines


def test_only_a_finished_run_with_the_same_settings_is_reused(tmp_path, make_config):
    config = make_config(out=tmp_path / "run", epochs=1, train_samples=100)
    assert not existing_run(config, overwrite=False)  # nothing there: to be trained
    ensure_run(config, overwrite=False)
    assert existing_run(config, overwrite=False)
    assert not existing_run(config, overwrite=True)  # to be trained again
    with pytest.raises(RunExistsError):
        existing_run(make_config(out=tmp_path / "run", epochs=2, train_samples=100), False)


def test_training_reports_its_epochs_as_one_task(make_config):
    ticks: list[Tick] = []
    train(make_config(train_samples=100), TrainCallbacks.ticking(ticks.append, "training x"))
    assert {t.task for t in ticks} == {"training x"}
    assert [(t.done, t.total, t.unit, t.finished) for t in ticks] == [
        (0, 2, "epochs", False),
        (1, 2, "epochs", False),
        (2, 2, "epochs", False),
        (2, 2, "epochs", True),
    ]


# -- the display itself ----------------------------------------------------------------


def test_plain_lines_come_at_most_once_per_interval_per_task_then_a_final_line():
    clock = FakeClock()
    display, buffer = plain_display(clock, interval=10)
    with display:
        for second in range(0, 25):
            clock.now = second
            display(Tick("trace", second, 30))
        display(Tick("trace", 25, 30, finished=True))
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "flatcli: trace 10/30 HVPs, 10 s, ETA 20 s",
        "flatcli: trace 20/30 HVPs, 20 s, ETA 10 s",
        "flatcli: trace 25/30 HVPs, 24 s",
    ]


def test_a_large_interval_from_the_environment_leaves_only_the_final_line(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "1000")
    clock = FakeClock()
    display, buffer = plain_display(clock)
    with display:
        for task in ("lambda_max", "trace"):
            for step in range(1, 50):
                clock.now += 1
                display(Tick(task, step, 100, "Lanczos steps", up_to=True))
            display(Tick(task, 49, 100, "Lanczos steps", up_to=True, finished=True))
    assert buffer.getvalue().splitlines() == [
        "flatcli: lambda_max 49 Lanczos steps (of up to 100), 48 s",
        "flatcli: trace 49 Lanczos steps (of up to 100), 48 s",
    ]


def test_an_interval_that_is_not_a_number_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "often")
    with pytest.raises(UsageError, match=INTERVAL_ENV):
        ProgressDisplay(Console(file=io.StringIO()))


def test_a_task_that_ends_by_an_error_gets_no_final_line():
    clock = FakeClock()
    display, buffer = plain_display(clock, interval=10)
    with pytest.raises(RuntimeError), display:
        display(Tick("density", 3, 512))
        raise RuntimeError("stopped")
    assert buffer.getvalue() == ""


def test_a_quiet_console_shows_nothing():  # torchrun ranks other than 0
    buffer = io.StringIO()
    with ProgressDisplay(Console(file=buffer, quiet=True), interval=0) as display:
        display(Tick("trace", 5, 10))
        display(Tick("trace", 10, 10, finished=True))
        display.say("epoch 1/1")
    assert buffer.getvalue() == ""


def test_on_a_terminal_the_bar_shows_its_total_and_the_time_remaining():
    clock = FakeClock()
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    with ProgressDisplay(console, clock=clock) as display:
        display(Tick("lambda_max", 0, 200, "Lanczos steps", up_to=True))
        clock.now = 10
        display(Tick("lambda_max", 40, 200, "Lanczos steps", up_to=True))
        clock.now = 12
        display(Tick("lambda_max", 48, 200, "Lanczos steps", up_to=True))
        display.say("a line that stays")
    screen = buffer.getvalue()
    # 8 steps in the last 2 s: (200 - 48) / 4 = 38 s at most
    assert "48 of up to 200 Lanczos steps" in screen
    assert "ETA up to 0:38" in screen
    assert "a line that stays" in screen


# -- the ticks themselves --------------------------------------------------------------


def test_a_task_counts_an_operators_products_from_its_own_start():
    ticks: list[Tick] = []
    task = Task(ticks.append, "trace", 30, start=100)
    task.update(110)
    task.update(130)
    task.finish()
    assert [(t.done, t.total, t.finished) for t in ticks] == [
        (0, 30, False),
        (10, 30, False),
        (30, 30, False),
        (30, 30, True),
    ]


def test_nothing_is_reported_without_a_callback():
    task = Task(None, "trace", 30)
    task.update(5)
    task.finish()  # no error, nothing to hear it


@pytest.mark.parametrize(
    ("cached", "note"),
    [
        ((), "measured"),
        (("lambda_max", "trace"), "cached"),
        (("trace",), "measured; trace cached"),
    ],
)
def test_a_cache_note_says_what_was_read_and_what_was_measured(cached, note):
    assert cache_note(cached, ("lambda_max", "trace")) == note
