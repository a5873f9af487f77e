"""Progress on stderr that people can trust: bars on a terminal, plain lines in a log.

Every command shows its long work through one :class:`ProgressDisplay`, which is a
:data:`~flatcli.analysis.progress.ProgressCallback`: the library reports
:class:`~flatcli.analysis.progress.Tick` s (a task, units done, the total where it is
known) and the display shows them.

* stderr is a terminal: one rich bar per running task with its description, done/total,
  the time elapsed and the time remaining (an estimate from the rate so far) when the
  total is known, a spinner and the count when it is not. Bars are transient; lines said
  with :meth:`ProgressDisplay.say` (an epoch's results, a demo's stages) stay on screen.
* stderr is a log file, a pipe, CI: no bars, but plain lines, at most one every
  :data:`PLAIN_INTERVAL_S` seconds per task (the environment variable
  :data:`INTERVAL_ENV` sets another interval), and one final line per task that says what
  was done: ``flatcli: lambda_max 40 Lanczos steps (of up to 200), 12 s``.
* under ``torchrun``, ranks other than 0 show nothing (the ``err`` console is quiet there).

A total that is an upper bound (Lanczos may stop before ``--max-iter``) is shown as
"of up to"; when the task ends early, its bar completes and its final line says how many
units were done. Nothing is shown for work that was not done: a task that ends by an
error gets no final line.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Task as BarTask
from rich.text import Text

from flatcli.analysis.progress import Tick
from flatcli.cli._common import err
from flatcli.errors import UsageError

__all__ = [
    "INFO_INTERVAL_S",
    "INTERVAL_ENV",
    "PLAIN_INTERVAL_S",
    "PREFIX",
    "ProgressDisplay",
    "count",
    "duration",
    "plain_interval",
    "plain_line",
]

#: Seconds between two plain lines of one task when stderr is not a terminal.
PLAIN_INTERVAL_S = 10.0
#: The environment variable that sets another interval (seconds; 0: a line per tick).
INTERVAL_ENV = "FLATCLI_PROGRESS_INTERVAL"
#: What every plain line starts with.
PREFIX = "flatcli: "
#: Seconds between two reads of a value shown beside a bar whose reading costs a device
#: synchronisation (the loss of a batch on a GPU).
INFO_INTERVAL_S = 0.5


def plain_interval() -> float:
    """The seconds between two plain lines of a task: :data:`INTERVAL_ENV`, else
    :data:`PLAIN_INTERVAL_S`.
    """
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return PLAIN_INTERVAL_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise UsageError(
            f"{INTERVAL_ENV}={text!r} is not a number of seconds",
            hint=f"unset it for the default of {PLAIN_INTERVAL_S:g} s",
        )
    return seconds


def duration(seconds: float) -> str:
    """``4.1 s``, ``48 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def count(tick: Tick) -> str:
    """The units of ``tick``: ``40/200 HVPs``, ``40 of up to 200 Lanczos steps`` (running),
    ``40 Lanczos steps (of up to 200)`` (ended early), ``3 runs`` (no total), or nothing
    for a task without units done or planned.
    """
    unit = f" {tick.unit}" if tick.unit else ""
    if tick.total is None:
        return f"{tick.done}{unit}" if tick.done else ""
    if tick.up_to and tick.done < tick.total:
        if tick.finished:
            return f"{tick.done}{unit} (of up to {tick.total})"
        return f"{tick.done} of up to {tick.total}{unit}"
    return f"{tick.done}/{tick.total}{unit}"


def remaining(tick: Tick, elapsed: float) -> float | None:
    """Seconds left at the rate so far (an upper bound for an ``up_to`` total), or None."""
    if tick.total is None or tick.done <= 0 or tick.finished:
        return None
    return elapsed / tick.done * max(tick.total - tick.done, 0)


def plain_line(tick: Tick, elapsed: float, info: str = "") -> str:
    """The plain line of a task: ``flatcli: TASK COUNT (NOTE), ELAPSED[, ETA ...][  INFO]``."""
    units = count(tick)
    text = PREFIX + tick.task + (f" {units}" if units else "")
    if tick.note:
        text += f" ({tick.note})"
    text += f", {duration(elapsed)}"
    eta = remaining(tick, elapsed)
    if eta is not None:
        text += f", ETA {'up to ' if tick.up_to else ''}{duration(eta)}"
    return text + (f"  {info}" if info and not tick.finished else "")


class _CountColumn(ProgressColumn):
    """done/total and the unit (``count`` of the task's tick)."""

    def render(self, task: BarTask) -> Text:
        tick: Tick = task.fields["tick"]
        return Text(count(tick), style="progress.download")


class _RemainingColumn(ProgressColumn):
    """``ETA 0:48`` when the total is known (``ETA -:--`` until a rate is known)."""

    max_refresh = 0.5

    def render(self, task: BarTask) -> Text:
        tick: Tick = task.fields["tick"]
        if tick.total is None or task.finished:
            return Text("")
        seconds = task.time_remaining
        if seconds is None:
            return Text("ETA -:--", style="progress.remaining")
        minutes, secs = divmod(int(seconds), 60)
        hours, minutes = divmod(minutes, 60)
        clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
        return Text(f"ETA {'up to ' if tick.up_to else ''}{clock}", style="progress.remaining")


@dataclass
class _Plain:
    """A task shown as plain lines: its last tick, when it began and when a line was said."""

    tick: Tick
    started: float
    said: float


class ProgressDisplay:
    """The progress of one command on ``console`` (default: the ``err`` console); use it
    as a context manager and pass it where a progress callback is taken.

    Args:
        console: where to show it; bars when it is a terminal, plain lines otherwise,
            nothing when it is quiet (``torchrun`` ranks other than 0).
        interval: seconds between two plain lines of a task (default
            :func:`plain_interval`).
        clock: the time source (seconds), for tests.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console or err
        self.interval = plain_interval() if interval is None else interval
        self.clock = clock
        self.terminal = self.console.is_terminal and not self.console.quiet
        self.plain = not self.console.is_terminal and not self.console.quiet
        self._bars: Progress | None = None
        self._ids: dict[str, TaskID] = {}
        self._tasks: dict[str, _Plain] = {}
        self._info: dict[str, str] = {}
        self._current: str | None = None

    # -- the context ---------------------------------------------------------------
    def __enter__(self) -> ProgressDisplay:
        if self.terminal:
            self._bars = Progress(
                SpinnerColumn(finished_text=" "),
                TextColumn("{task.description}"),
                BarColumn(),
                _CountColumn(),
                TimeElapsedColumn(),
                _RemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=True,
                get_time=self.clock,
            )
            self._bars.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    # -- what the library reports --------------------------------------------------
    def __call__(self, tick: Tick) -> None:
        """Show ``tick`` (the :data:`~flatcli.analysis.progress.ProgressCallback`)."""
        self._current = None if tick.finished else tick.task
        if self.plain:
            self._plain_tick(tick)
        elif self._bars is not None:
            self._bar_tick(self._bars, tick)
        if tick.finished:
            self._info.pop(tick.task, None)

    def status(self, text: str) -> None:
        """Show ``text`` (e.g. the current estimate) beside the task that ticked last."""
        if self._current is None:
            return
        self._info[self._current] = text
        if self._bars is not None and self._current in self._ids:
            self._bars.update(self._ids[self._current], info=escape(text))

    def info(self, task: str, text: str) -> None:
        """Show ``text`` beside ``task`` (e.g. the loss of the last batch)."""
        self._info[task] = text
        if self._bars is not None and task in self._ids:
            self._bars.update(self._ids[task], info=escape(text))

    def say(self, text: str, style: str | None = None) -> None:
        """A line that stays: above the bars on a terminal, as it is in a log."""
        if self.terminal and self._bars is not None:
            self._bars.console.print(text, style=style, markup=False, highlight=False)
        elif self.plain or self.terminal:
            self.console.print(text, style=style, markup=False, highlight=False)

    def drop(self, task: str) -> None:
        """End ``task`` without a final line (a bar that starts again, e.g. each epoch's batches)."""
        self._tasks.pop(task, None)
        self._info.pop(task, None)
        if self._bars is not None and task in self._ids:
            self._bars.remove_task(self._ids.pop(task))

    # -- plain lines ---------------------------------------------------------------
    def _plain_tick(self, tick: Tick) -> None:
        now = self.clock()
        state = self._tasks.get(tick.task)
        if state is None:
            state = self._tasks[tick.task] = _Plain(tick, now, now)
        state.tick = tick
        if tick.finished:
            del self._tasks[tick.task]
            self._line(tick, now - state.started)
        elif now - state.said >= self.interval and (tick.done or tick.total is None):
            state.said = now
            self._line(tick, now - state.started)

    def _line(self, tick: Tick, elapsed: float) -> None:
        text = plain_line(tick, elapsed, self._info.get(tick.task, ""))
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # -- bars ----------------------------------------------------------------------
    def _bar_tick(self, bars: Progress, tick: Tick) -> None:
        key = self._ids.get(tick.task)
        if key is None:
            key = self._ids[tick.task] = bars.add_task(
                escape(tick.task), total=tick.total, completed=tick.done, tick=tick, info=""
            )
        if tick.finished:  # the bar completes, then goes: its units are said in the log mode
            bars.update(key, total=max(tick.done, 1), completed=max(tick.done, 1), tick=tick)
            bars.remove_task(self._ids.pop(tick.task))
            return
        bars.update(key, total=tick.total, completed=tick.done, tick=tick)
