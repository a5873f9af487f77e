"""``flatcli train`` through the CLI: exit codes, JSON on stdout, one-line errors on stderr."""

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from flatcli.cli import app, main

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def invoke_main(*args):
    """``flatcli ARGS`` as the console script runs it: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["flatcli", *(str(a) for a in args)]
    with mock.patch.object(sys, "argv", argv), redirect_stdout(stdout), redirect_stderr(stderr):
        with pytest.raises(SystemExit) as exit_:
            main()
    return exit_.value.code, stdout.getvalue(), stderr.getvalue()


def test_train_json_prints_one_document_with_final_metrics():
    result = invoke("train", "--epochs", 3, "--out", "run", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) >= {
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "weight_norm",
        "epochs",
        "seconds",
        "checkpoint",
    }
    assert Path(doc["checkpoint"]).is_file() and doc["epochs"] == 3


def test_train_human_output_is_a_table():
    result = invoke("train", "--epochs", 1, "--out", "run", "--model", "mlp", "--width", 8)
    assert result.exit_code == 0 and "test accuracy" in result.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "nope"], 2, "'nope' is not one of 'logreg', 'mlp', 'cnn'"),
        (["--dataset", "nope"], 2, "'nope' is not one of 'digits', 'mnist'"),
        (["--dataset", "mnist", "--data-dir", "missing"], 1, "mnist not found"),
        (["--epochs", "0"], 2, "epochs must be positive"),
        (["--lr", "0"], 2, "lr must be positive"),
        (["--batch-size", "-1"], 2, "batch size must be positive"),
        (["--l2", "-1"], 2, "l2 must be >= 0"),
        (["--weight-decay", "-1"], 2, "weight decay must be >= 0"),
        (["--epochs", "2", "--average-from", "3"], 2, "--average-from 3"),
        (["--optimizer", "lbfgs"], 2, "'lbfgs' is not one of 'sgd', 'adam', 'adamw'"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_a_nonzero_exit(args, code, message):
    exit_code, stdout, stderr = invoke_main("train", "--out", "run", *args)
    assert exit_code == code
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in stderr
    assert not Path("run/model.safetensors").exists()


def test_out_pointing_at_an_existing_run_or_a_file():
    assert invoke("train", "--epochs", 1, "--out", "run").exit_code == 0
    result = invoke("train", "--epochs", 1, "--out", "run")
    assert result.exit_code == 1 and "already holds a run" in result.stderr
    Path("f").write_text("x")
    result = invoke("train", "--epochs", 1, "--out", "f")
    assert result.exit_code == 1 and "is a file" in result.stderr and Path("f").read_text() == "x"


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "flatcli", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip()


def test_parser_errors_of_the_console_script_are_one_line_too():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "flatcli", "train", "--epochs", "abc"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--epochs" in lines[0] and "Traceback" not in proc.stderr
