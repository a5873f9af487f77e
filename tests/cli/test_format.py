"""``--format table|markdown|csv|json`` on every command (issue 11): the same tables the
terminal shows, as GitHub markdown or CSV blocks; ``--json`` is ``--format json``; the two
contradicting is one line, exit code 2, before anything is measured.

Every command runs on the fixed results of ``fakes.py`` (the library calls are patched).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.table import Table

from flatcli.report.formats import Collector, plain, to_csv, to_markdown
from flatcli.workflows.training import TrainResult

from .fakes import COMPARISON, DEMO, EXACT_RANK, SWEEP, sharpness_report
from .helpers import invoke, invoke_main, one_line_error

TRAINED = TrainResult(
    run_dir=Path("runs/r"),
    checkpoint=Path("runs/r/model.safetensors"),
    metrics={
        "train_loss": 0.25,
        "train_accuracy": 0.9,
        "test_loss": 0.5,
        "test_accuracy": 0.875,
        "weight_norm": 3.0,
        "epochs": 3,
        "seconds": 1.0,
    },
)

REPORT = sharpness_report()  # both ends of the spectrum, trace, Frobenius norm, a density

#: Each command's arguments (its library call patched by the ``fixed`` fixture), and the
#: module whose ``out`` console prints its tables.
COMMANDS = {
    "train": (["train"], "flatcli.cli.train"),
    "sharpness": (["sharpness", "run"], "flatcli.cli.sharpness"),
    "sweep": (["sharpness", "run", "--scale", "1,2"], "flatcli.cli.sharpness"),
    "rank-bound": (["rank-bound", "run"], "flatcli.cli.rank_bound"),
    "compare": (["compare", "a", "b", "--explain"], "flatcli.cli.compare"),
    "demo": (["demo", "--verbose", "--no-plots"], "flatcli.cli.demo"),
}


@pytest.fixture
def fixed(spy):
    """Every command's library call answers with a fixed result."""
    spy("flatcli.workflows.training", "train", TRAINED)
    spy("flatcli.workflows.sharpness", "checkpoint_sharpness", REPORT)
    point = SimpleNamespace(model="model", inputs="x", targets=[0, 1])
    spy("flatcli.workflows.sharpness", "load_point", point)
    spy("flatcli.analysis.sweep", "scaling_sweep", SWEEP)
    spy("flatcli.workflows.rank", "rank_checkpoint", EXACT_RANK)
    spy("flatcli.workflows.compare", "compare_checkpoints", COMPARISON)
    return spy("flatcli.workflows.demo", "run_demo", DEMO)


def tables_on_screen(monkeypatch, command: str) -> list[Table]:
    """The tables the command prints in the default format (its console collected)."""
    args, module = COMMANDS[command]
    collector = Collector()
    monkeypatch.setattr(importlib.import_module(module), "out", collector)
    assert invoke(*args).exit_code == 0
    return [b for b in collector.blocks if isinstance(b, Table)]


def cells(table: Table) -> list[list[str]]:
    """A table's header and rows as the one-line plain texts the formats write."""
    columns = [[plain(c.header), *map(plain, c.cells)] for c in table.columns]
    return [[" ".join(x.split()) for x in row] for row in zip(*columns, strict=True)]


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The GitHub tables of a markdown text, each as rows of cells (the ``|---|`` row checked)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
            continue
        if current:
            header, rule, *rows = current
            assert set(rule.replace("|", "").replace(":", "")) == {"-"}, rule
            tables.append([_markdown_row(header), *map(_markdown_row, rows)])
            current = []
    return tables


def _markdown_row(line: str) -> list[str]:
    assert line.startswith("| ") or line.startswith("|-") or line.startswith("|:")
    inner = line.strip()[1:-1].replace("\\|", "\x00")
    return [cell.strip().replace("\x00", "|").replace("\\\\", "\\") for cell in inner.split("|")]


def csv_blocks(text: str) -> list[tuple[str | None, list[list[str]]]]:
    """The CSV blocks: each its ``# title`` (or None) and its rows."""
    blocks = []
    for chunk in text.split("\n\n"):
        lines = chunk.strip("\n").splitlines()
        title = lines[0][2:] if lines and lines[0].startswith("# ") else None
        rows = list(csv.reader(io.StringIO("\n".join(lines[1:] if title else lines))))
        blocks.append((title, rows))
    return blocks


# --- markdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_markdown_is_the_screens_tables_as_github_tables(fixed, monkeypatch, command):
    expected = tables_on_screen(monkeypatch, command)
    result = invoke(*COMMANDS[command][0], "--format", "markdown")
    assert result.exit_code == 0, result.stderr
    tables = markdown_tables(result.stdout)
    assert len(tables) == len(expected) > 0
    for got, table in zip(tables, expected, strict=True):
        assert {len(row) for row in got} == {len(table.columns)}  # the same cells in every row
        assert got == cells(table)
        if table.title:
            assert f"### {' '.join(plain(table.title).split())}" in result.stdout


def test_markdown_puts_statements_under_the_tables_and_histograms_in_code_blocks(fixed):
    ranked = invoke("rank-bound", "run", "--format", "markdown").stdout
    assert ranked.rstrip().splitlines()[-1].startswith("Rank bound (C-1)")  # the statement
    measured = invoke("sharpness", "run", "--format", "markdown").stdout
    assert "```text\neigenvalue interval" in measured
    assert "*107 Hessian-vector products in 1.50 s*" in measured  # the caption


# --- CSV -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_csv_is_one_rectangular_block_per_table_headed_by_its_columns(fixed, monkeypatch, command):
    expected = tables_on_screen(monkeypatch, command)
    result = invoke(*COMMANDS[command][0], "--format", "csv")
    assert result.exit_code == 0, result.stderr
    blocks = csv_blocks(result.stdout)
    assert len(blocks) == len(expected) > 0
    for (title, rows), table in zip(blocks, expected, strict=True):
        assert len({len(row) for row in rows}) == 1  # rectangular
        assert rows == cells(table)  # header row = the table's columns, then its rows
        assert title == (" ".join(plain(table.title).split()) if table.title else None)


def test_csv_leaves_out_prose_and_markup(fixed):
    text = invoke("compare", "a", "b", "--explain", "--format", "csv").stdout
    assert "b vs a:" not in text and "[" not in text and "- " not in text.splitlines()[0]


# --- JSON and the option itself -------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_json_is_format_json(fixed, command):
    args = COMMANDS[command][0]
    short, long = invoke(*args, "--json"), invoke(*args, "--format", "json")
    assert short.exit_code == long.exit_code == 0
    docs = [json.loads(r.stdout) for r in (short, long)]
    for doc in docs:
        del doc["provenance"]["time"]  # the one part that is each call's own
    assert docs[0] == docs[1] and docs[0]["schema_version"] == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_json_and_another_format_contradict_before_anything_runs(fixed, command):
    result = invoke(*COMMANDS[command][0], "--json", "--format", "csv")
    one_line_error(result, 2, "--json and --format csv contradict")
    assert fixed.calls == []


def test_an_unknown_format_names_the_valid_ones(fixed):
    result = invoke_main("train", "--format", "xml")
    one_line_error(result, 2, "'--format'", "is not one of 'table', 'markdown', 'csv', 'json'")


@pytest.mark.parametrize("command", COMMANDS)
def test_the_table_format_is_the_default(fixed, monkeypatch, command):
    args, module = COMMANDS[command]
    first = [plain(t) for t in tables_on_screen(monkeypatch, command)]
    collector = Collector()
    monkeypatch.setattr(importlib.import_module(module), "out", collector)
    assert invoke(*args, "--format", "table").exit_code == 0
    assert [plain(b) for b in collector.blocks if isinstance(b, Table)] == first


@pytest.mark.parametrize("command", COMMANDS)
def test_tables_fit_100_columns_without_cutting_a_label(fixed, screen, command):
    args, module = COMMANDS[command]
    console = screen(module)
    assert invoke(*args).exit_code == 0
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 100


# --- the renderers --------------------------------------------------------------------------


def _table() -> Table:
    table = Table(title="[bold]runs[/] compared", caption="a caption")
    table.add_column("name")
    table.add_column("value\n(points)", justify="right")
    table.add_row("a|b", "[red]1.5[/]")
    table.add_row("two\nlines", "2")
    return table


def test_markdown_escapes_pipes_drops_markup_and_aligns_columns():
    text = to_markdown([_table(), "a [i]statement[/]", "two\nsentences", "laid  out\nin  columns"])
    assert text == (
        "### runs compared\n\n"
        "| name | value (points) |\n"
        "|---|---:|\n"
        "| a\\|b | 1.5 |\n"
        "| two lines | 2 |\n\n"
        "*a caption*\n\n"
        "a statement\n\n"
        "two\n\nsentences\n\n"
        "```text\nlaid  out\nin  columns\n```\n"
    )


def test_csv_writes_titled_blocks_and_quotes_what_needs_it():
    untitled = Table()
    untitled.add_column("x")
    untitled.add_row("1,5")
    assert to_csv([_table(), "prose", untitled]) == (
        '# runs compared\nname,value (points)\na|b,1.5\ntwo lines,2\n\nx\n"1,5"\n'
    )
