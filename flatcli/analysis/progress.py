"""Progress of long computations, as data: which task, how far, out of how many.

The library never prints. A long computation (a Lanczos run, a dense Hessian, a sweep,
the runs of a comparison) reports :class:`Tick` s to a :data:`ProgressCallback`, and the
command line turns them into bars on a terminal or plain lines in a log
(:mod:`flatcli.cli.progress`). A tick says what is known and nothing more: a total only
where the work is planned ahead (the P products of a dense Hessian, ``probes`` of
Hutch++), marked ``up_to`` where an iterative method may stop before it (Lanczos stops
when its error bound meets the tolerance), and ``None`` where it is not known at all.

The HVP counts come from the operator's own callback, one call per data pass
(:class:`flatcli.curvature.operator.CurvatureOperator`), never one per parameter or
product; :class:`Task` turns that running count into ticks of one task.

This module is torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

__all__ = ["ProgressCallback", "Task", "Tick", "cache_note", "scoped"]


@dataclass(frozen=True)
class Tick:
    """One report of progress: ``done`` of ``total`` ``unit`` of the task ``task``.

    Attributes:
        task: the task's name, also its identity: ticks with the same name are one task
            until one of them is ``finished`` (a later tick of that name starts anew).
        done: units done so far (on the last tick: all that were done).
        total: units planned, or ``None`` when unknown.
        unit: what is counted ("HVPs", "Lanczos steps", "epochs", "points", ...).
        up_to: ``total`` is an upper bound: the task may finish with fewer.
        finished: the task's last tick.
        note: what the task's result was, on the last tick (e.g. "cached").
    """

    task: str
    done: int
    total: int | None = None
    unit: str = "HVPs"
    up_to: bool = False
    finished: bool = False
    note: str = ""


#: Where ticks go: the command line's display, a test's list (``ticks.append``), ...
ProgressCallback = Callable[[Tick], None]


def scoped(report: ProgressCallback | None, prefix: str) -> ProgressCallback | None:
    """``report`` with ``"prefix: "`` before each task name (the run or sweep point that
    a measure's ticks belong to); ``None`` stays ``None``.
    """
    if report is None:
        return None
    sink = report

    def forward(tick: Tick) -> None:
        sink(replace(tick, task=f"{prefix}: {tick.task}"))

    return forward


class Task:
    """One task's ticks to a progress callback: made at the task's start (its first tick),
    :meth:`update` with a running count, :meth:`finish` at its end.

    A count of an operator's products: pass :meth:`update` as (or call it from) the
    operator's ``progress`` callback, which hears its running HVP count after each data
    pass, with ``start`` the count when the task began. A count of anything else (runs,
    sweep points, layers): ``start=0`` and the units done so far.

    Every method does nothing when ``report`` is ``None``.
    """

    def __init__(
        self,
        report: ProgressCallback | None,
        task: str,
        total: int | None,
        *,
        unit: str = "HVPs",
        up_to: bool = False,
        start: int = 0,
    ) -> None:
        self.report, self.start = report, start
        self.tick = Tick(task, 0, total, unit, up_to)
        self._send(self.tick)

    def update(self, count: int) -> None:
        """The running count is ``count`` (an operator's: its products in all)."""
        self.tick = replace(self.tick, done=count - self.start)
        self._send(self.tick)

    def finish(self, done: int | None = None, note: str = "") -> None:
        """The task ended having done ``done`` units (default: as many as counted)."""
        count = self.tick.done if done is None else done
        self._send(replace(self.tick, done=count, finished=True, note=note))

    def _send(self, tick: Tick) -> None:
        if self.report is not None:
            self.report(tick)


def cache_note(cached: Sequence[str], measured: Sequence[str]) -> str:
    """What a task's last tick says of a result partly or wholly read from a cache:
    ``"cached"``, ``"measured"``, or ``"measured; trace cached"`` (``cached``: the names
    read from the cache; ``measured``: all the names of the result).
    """
    if not cached:
        return "measured"
    if set(measured) <= set(cached):
        return "cached"
    return f"measured; {', '.join(cached)} cached"
