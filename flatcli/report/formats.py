"""A command's tables in the formats people paste elsewhere: GitHub markdown and CSV.

A command draws its result on a console (rich tables from :mod:`flatcli.report.tables`,
and prose: statements, legends, histograms). For ``--format markdown`` or ``--format
csv`` it draws on a :class:`Collector` instead, which keeps what was printed, and
:data:`RENDERERS` turn that into text. The conventions, the same for every command:

* markdown: each table under a ``### title`` heading (when it has a title), as a GitHub
  table (a header row, a ``|---|`` row with the column's alignment, one row per row); its
  caption in italics under it; prose as paragraphs (one per line), or in a fenced ``text``
  block when it is laid out in columns (a histogram).
* CSV: each table as a block of rows, a header row first (the column headers), preceded
  by a ``# title`` comment line when it has a title; blocks separated by a blank line.
  Prose and captions are left out (``pandas.read_csv(..., comment="#")`` reads a block).

Cells are their plain text as printed (markup dropped, numbers as the table writes them,
a cell's lines joined by one space), so a pasted table says what the terminal said.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["RENDERERS", "Collector", "plain", "to_csv", "to_markdown"]

#: The width prose other than text is rendered at (as the tables on a piped stdout).
WIDTH = 100

#: Markdown's mark of a column's alignment, by the column's ``justify``.
_ALIGN = {"left": "---", "default": "---", "full": "---", "center": ":---:", "right": "---:"}


class Collector(Console):
    """A console that keeps what is printed to it, in order, instead of drawing it."""

    def __init__(self) -> None:
        """An empty collector (its own output, if any, goes nowhere)."""
        super().__init__(file=io.StringIO(), width=WIDTH, color_system=None)
        self.blocks: list[object] = []

    def print(self, *objects: object, **options: object) -> None:
        """Keep ``objects``; the print options (style, highlighting) do not apply to text."""
        self.blocks.extend(objects)


def plain(cell: object) -> str:
    """A cell, title or prose as plain text: markup dropped; other renderables drawn plainly."""
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    console = Console(file=io.StringIO(), width=WIDTH, color_system=None, record=True)
    console.print(cell)
    return console.export_text().rstrip("\n")


def _one_line(cell: object) -> str:
    return " ".join(plain(cell).split())


def _rows(table: Table) -> list[list[str]]:
    """The table's header row, then its rows, as one-line plain texts."""
    header = [_one_line(c.header) for c in table.columns]
    cells = [[_one_line(x) for x in column.cells] for column in table.columns]
    return [header, *[list(row) for row in zip(*cells, strict=True)]]


def _markdown_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _markdown_table(table: Table) -> str:
    header, *rows = _rows(table)
    lines = [
        "| " + " | ".join(_markdown_cell(h) for h in header) + " |",
        "|" + "|".join(_ALIGN.get(str(c.justify), "---") for c in table.columns) + "|",
        *["| " + " | ".join(_markdown_cell(x) for x in row) + " |" for row in rows],
    ]
    parts = [f"### {_one_line(table.title)}"] if table.title else []
    parts.append("\n".join(lines))
    if table.caption:
        parts.append(f"*{_one_line(table.caption)}*")
    return "\n\n".join(parts)


def _markdown_prose(block: object) -> str:
    """Sentences as paragraphs (one per line); text laid out in columns in a code block."""
    text = plain(block).strip("\n")
    lines = text.splitlines()
    if len(lines) > 1 and any("  " in line.strip() for line in lines):
        return f"```text\n{text}\n```"
    return "\n\n".join(line for line in lines if line.strip())


def to_markdown(blocks: Sequence[object]) -> str:
    """What a command printed, as markdown (the module docstring's conventions)."""
    parts = [
        _markdown_table(b) if isinstance(b, Table) else _markdown_prose(b)
        for b in blocks
        if isinstance(b, Table) or plain(b).strip()
    ]
    return "\n\n".join(parts) + "\n"


def to_csv(blocks: Sequence[object]) -> str:
    """The tables a command printed, as CSV blocks (the module docstring's conventions)."""
    parts = []
    for table in (b for b in blocks if isinstance(b, Table)):
        buffer = io.StringIO()
        if table.title:
            buffer.write(f"# {_one_line(table.title)}\n")
        csv.writer(buffer, lineterminator="\n").writerows(_rows(table))
        parts.append(buffer.getvalue())
    return "\n".join(parts)


#: The text formats of ``--format`` (besides ``table``, the console itself, and ``json``,
#: the document), each a function of the blocks a command printed.
RENDERERS: dict[str, Callable[[Sequence[object]], str]] = {
    "markdown": to_markdown,
    "csv": to_csv,
}
