"""The paper's protocol for people: the plan before training, the results beside the paper's.

:func:`plan_table` is what ``flatcli demo --protocol paper`` prints before it trains (and
all that ``--dry-run`` prints); :func:`results_table` and :func:`ratios_table` set
flatcli's measurements beside the published ones (:mod:`flatcli.analysis.paper`), "—"
where the paper has none. :func:`plan_as_dict` and :func:`protocol_as_dict` are the JSON
documents of the same.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from flatcli.analysis.paper import RATIOS, PublishedRatio, published_ratio
from flatcli.report.schema import document
from flatcli.workflows.protocol import (
    OVERRIDES,
    RECIPE_SOURCES,
    PlannedRun,
    ProtocolPlan,
    ProtocolResult,
)
from flatcli.workflows.provenance import provenance

__all__ = [
    "duration",
    "plan_as_dict",
    "plan_table",
    "plan_fields",
    "plan_settings",
    "plan_sources",
    "print_plan",
    "protocol_as_dict",
    "protocol_figures",
    "protocol_report",
    "ratios",
    "ratios_table",
    "results_table",
]

#: What the paper has no number for.
MISSING = "—"
#: How the status of a planned run reads.
_STATUS = {
    "new": "trains",
    "finished": "reused",
    "replace": "retrains",
}


def duration(seconds: float | None) -> str:
    """``45 s``, ``12 min``, ``3.2 h``, ``5.1 d``; "—" when not estimated."""
    if seconds is None:
        return MISSING
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            value = seconds / size
            return f"{value:.1f} {unit}" if unit != "min" and value < 100 else f"{value:.0f} {unit}"
    return f"{seconds:.0f} s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _g(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3g}"


def _status(run: PlannedRun) -> str:
    if run.status == "stopped":
        return f"resumes at {run.done + 1}"
    return _STATUS[run.status]


def plan_table(plan: ProtocolPlan) -> Table:
    """One row per planned run: recipe, lr, L2, wd, epochs, averaging start, what happens
    to it, and its estimated time.
    """
    c = plan.config
    where = (
        f"{_count(len(plan.runs), 'run')} ({_count(len(c.models), 'model')} x "
        f"{_count(len(c.arms), 'arm')}) under {c.out}"
    )
    total = plan.total_seconds
    device = next(iter(plan.estimates.values())).device if plan.estimates else None
    timing = f"; estimated {duration(total)} on {device}" if total is not None else ""
    table = Table(
        title=f"The paper's protocol on {c.dataset}: {where}{timing}", box=box.SIMPLE_HEAD
    )
    for name, justify in (
        ("run", "left"),
        ("recipe", "left"),
        ("lr", "right"),
        ("L2", "right"),
        ("wd", "right"),
        ("epochs", "right"),
        ("avg. from", "right"),
        ("status", "left"),
        ("time", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]  # rich's Literal
    for run in plan.runs:
        tc = run.config
        table.add_row(
            run.name + ("*" if (run.model, run.arm) in OVERRIDES else ""),
            tc.recipe or "",
            f"{tc.lr:g}",
            f"{tc.l2:g}",
            f"{tc.weight_decay:g}",
            str(tc.epochs),
            str(tc.average_from) if tc.average_from else MISSING,
            _status(run),
            duration(plan.seconds(run)),
        )
    return table


def plan_sources(plan: ProtocolPlan) -> list[str]:
    """Where the plan's values come from: one line per recipe used, then one per
    per-model value (the runs it applies to, marked * in the plan).
    """
    recipes = dict.fromkeys(r.config.recipe for r in plan.runs if r.config.recipe)
    lines = [f"{recipe}: {RECIPE_SOURCES[recipe]}" for recipe in recipes]
    by_source: dict[str, list[str]] = {}
    for run in plan.runs:
        override = OVERRIDES.get((run.model, run.arm))
        if override is not None:
            by_source.setdefault(override.source, []).append(run.name)
    lines += [f"{', '.join(names)}*: {source}" for source, names in by_source.items()]
    return lines


def plan_fields(plan: ProtocolPlan) -> dict[str, object]:
    """The plan as JSON: settings, sizes, each run's training options, and the estimates."""
    c = plan.config
    return {
        "protocol": "paper",
        "dataset": c.dataset,
        "out": str(c.out),
        "train_samples": plan.train_size,
        "test_samples": plan.test_size,
        "measure_samples": plan.measure_size,
        "estimators": {
            "max_iter": c.max_iter,
            "probes": c.probes,
            "density_iterations": c.density_iterations,
            "density_probes": c.density_probes,
            "bn_mode": "batch",
        },
        "runs": [
            {
                "run": run.name,
                "model": run.model,
                "arm": run.arm,
                "out": str(run.out),
                "status": run.status,
                "epochs_done": run.done,
                "source": run.source,
                "estimated_seconds": plan.seconds(run),
                "train": run.config.recorded(),
            }
            for run in plan.runs
        ],
        "estimates": {name: vars(est) for name, est in plan.estimates.items()},
        "estimated_seconds": plan.total_seconds,
    }


def results_table(result: ProtocolResult) -> Table:
    """Per run: lambda_max, Tr/P and ||w|| as flatcli measured them, the paper's beside
    them, and the test accuracy.
    """
    table = Table(title=f"flatcli beside the paper on {result.plan.config.dataset}")
    for name in (
        "run",
        "lambda_max",
        "paper",
        "Tr/P",
        "paper ",
        "||w||",
        "paper  ",
        "test acc.",
    ):
        table.add_column(name, justify="left" if name == "run" else "right")
    for row in result.rows:
        pub = row.published
        table.add_row(
            row.name,
            _g(row.lambda_max.value),
            _g(pub.lambda_max if pub else None),
            _g(row.trace_per_param),
            _g(pub.trace_per_param if pub else None),
            _g(row.report.weight_norm),
            _g(pub.weight_norm if pub else None),
            MISSING if row.test_accuracy is None else f"{row.test_accuracy:.2%}",
        )
    return table


def ratios(result: ProtocolResult) -> list[tuple[PublishedRatio, str, float | None, float | None]]:
    """(ratio, model, flatcli's lambda_max ratio, the paper's quote) for each model that
    ran both arms of a quoted ratio.
    """
    out = []
    for ratio in RATIOS:
        for model in result.plan.config.models:
            a, b = result.row(model, ratio.numerator), result.row(model, ratio.denominator)
            if a is None or b is None:
                continue
            ours = a.lambda_max.value / b.lambda_max.value if b.lambda_max.value else None
            out.append(
                (ratio, model, ours, published_ratio(ratio, result.plan.config.dataset, model))
            )
    return out


def ratios_table(result: ProtocolResult) -> Table:
    """The lambda_max ratios the paper quotes, flatcli's from its runs beside them."""
    table = Table(title="lambda_max ratios the paper quotes")
    for name in ("ratio", "arms", "model", "flatcli", "paper"):
        table.add_column(name, justify="right" if name in ("flatcli", "paper") else "left")
    for ratio, model, ours, quoted in ratios(result):
        table.add_row(
            ratio.name,
            f"{ratio.numerator} / {ratio.denominator}",
            model,
            MISSING if ours is None else f"{ours:.3g}x",
            MISSING if quoted is None else f"{quoted:g}x",
        )
    return table


def plan_as_dict(plan: ProtocolPlan) -> dict[str, object]:
    """The JSON document of ``flatcli demo --protocol paper --dry-run --json``: the plan."""
    return document("demo", plan_fields(plan), provenance(plan.config.device))


def protocol_as_dict(result: ProtocolResult) -> dict[str, object]:
    """The JSON document of ``flatcli demo --protocol paper --json``: the plan, each run's
    measurements beside the paper's, the ratios, and the seconds.
    """
    body = {
        "protocol": "paper",
        "plan": plan_fields(result.plan),
        "runs": [
            {
                "run": row.name,
                "model": row.model,
                "arm": row.arm,
                "recipe": row.recipe,
                "checkpoint": str(row.run),
                "lambda_max": row.lambda_max.as_dict(),
                "trace": row.trace.as_dict(),
                "trace_per_param": row.trace_per_param,
                "num_params": row.report.num_params,
                "weight_norm": row.report.weight_norm,
                "test_accuracy": row.test_accuracy,
                "density": row.density.as_dict(),
                "paper": vars(row.published) if row.published else None,
            }
            for row in result.rows
        ],
        "ratios": [
            {
                "ratio": ratio.name,
                "numerator": ratio.numerator,
                "denominator": ratio.denominator,
                "model": model,
                "flatcli": ours,
                "paper": quoted,
                "source": ratio.source,
            }
            for ratio, model, ours, quoted in ratios(result)
        ],
        "seconds": result.seconds,
    }
    return document("demo", body, provenance(result.plan.config.device))


def plan_settings(plan: ProtocolPlan) -> list[str]:
    """What the plan trains and measures on, and with which estimator settings."""
    c = plan.config
    sizes = f"Train on {plan.train_size} samples, measure on {plan.measure_size}"
    if c.epochs is not None or c.train_samples is not None or c.samples is not None:
        sizes += " (overridden: the paper uses every sample for 300 epochs)"
    timed = []
    if plan.estimates:
        first = next(iter(plan.estimates.values()))
        timed.append(f"Timed on {first.device} (warm-up batches of {first.warmup_batch}):")
        timed += [
            f"  {name}: an epoch {duration(e.epoch_s)}, a run's measurements {duration(e.measure_s)}"
            for name, e in plan.estimates.items()
        ]
    return [
        *timed,
        sizes + ".",
        f"Hessian without the L2 term, BatchNorm in batch mode: Lanczos {c.max_iter} steps at "
        f"most, {c.probes} trace probes,",
        f"SLQ {c.density_iterations} steps x {c.density_probes} probes. "
        "* marks per-model values. Where each value comes from:",
    ]


def print_plan(console: Console, plan: ProtocolPlan) -> None:
    """The plan table, its settings and the sources of its values."""
    console.print(plan_table(plan))
    for line in plan_settings(plan):
        console.print(line, highlight=False)
    for line in plan_sources(plan):
        console.print(f"  {line}", highlight=False)


def protocol_figures(result: ProtocolResult, folder: Path) -> list[Path]:
    """Each run's spectral density (:func:`flatcli.report.plots.density_figure`) as
    ``folder/MODEL-ARM-density.png``; the paths written. Needs matplotlib.
    """
    from flatcli.report import plots  # matplotlib: an optional dependency

    folder.mkdir(parents=True, exist_ok=True)
    return [
        plots.save_figure(
            plots.density_figure(row.density, row.report), folder / f"{row.name}-density.png"
        )
        for row in result.rows
    ]


def protocol_report(console: Console, result: ProtocolResult) -> None:
    """The results beside the paper's and the ratios it quotes."""
    console.print(results_table(result))
    if ratios(result):
        console.print(ratios_table(result))
    console.print(f"{len(result.rows)} runs measured in {duration(result.seconds)}.")
