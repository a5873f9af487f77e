"""``flatcli demo``: the paper's two contrasts, measured end to end on one data set.

For each model (default: logistic regression, an MLP and a small CNN) three runs are trained with
the same seed and data:

* ``sgd``:    plain SGD, no regularisation;
* ``sgd-l2``: the same with coupled L2 (``--l2``), claim 2 of Granziol (2020): the
  regularised solution is *sharper* yet generalises better;
* ``gadam``:  AdamW with decoupled weight decay and iterate averaging (Gadam), claim 3:
  sharper than SGD yet generalises better.

Then ``compare`` tables for the two contrasts, a rank-bound table (claim 4) and a
weight-scaling sweep (claim 1's mechanism: larger weights, same predictions, flatter
Hessian), and a summary of which claims held *on these measurements*. Nothing in the
summary is canned: every sentence is computed from the numbers, ties included.

Runs are kept under ``out/MODEL-VARIANT``; a rerun with the same settings reuses them (and
their cached sharpness), a run made with other settings is never overwritten unless
``overwrite`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flatcli.analysis.measures import SharpnessConfig
from flatcli.analysis.rank import RankReport, rank_report
from flatcli.analysis.sweep import SweepRow, scaling_sweep
from flatcli.config import TrainConfig, make_train_config
from flatcli.errors import RunExistsError, UsageError
from flatcli.models import MODELS, resolve_kwargs
from flatcli.workflows.checkpoint import MODEL_FILE, read_metadata
from flatcli.workflows.compare import Comparison, compare_checkpoints
from flatcli.workflows.data import get_spec
from flatcli.workflows.sharpness import load_point
from flatcli.workflows.training import train

#: Variants of each model: name -> options of make_train_config (besides model and data).
VARIANTS: dict[str, dict] = {
    "sgd": {"optimizer": "sgd", "lr": 0.05},
    "sgd-l2": {"optimizer": "sgd", "lr": 0.05, "l2": 5e-3},
    "gadam": {"recipe": "gadam", "lr": 0.01},
}
CONTRASTS = (("sgd", "sgd-l2", "L2 regularisation"), ("sgd", "gadam", "Gadam vs SGD"))
DEMO_MEASURES = (
    "lambda_max",
    "trace",
    "frobenius",
    "lambda_max_normalised",
    "trace_normalised",
    "adaptive_sharpness",
    "relative_flatness",
)


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    models: tuple[str, ...] = ("logreg", "mlp", "cnn")
    epochs: int = 60
    train_samples: int | None = None
    measure_samples: int | None = None
    probes: int = 99
    sweep_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    out: Path = Path("runs/demo")
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    @classmethod
    def reduced(cls, **kw) -> DemoConfig:
        """A small version for tests: a few epochs on a subset, cheap estimators."""
        base = dict(
            models=("logreg", "mlp"),
            epochs=3,
            train_samples=300,
            measure_samples=300,
            probes=12,
            sweep_scales=(1.0, 4.0),
        )
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims, and whether it held here (None: tie or inconclusive)."""

    claim: str
    model: str
    held: bool | None
    evidence: str


@dataclass(frozen=True)
class DemoResult:
    config: DemoConfig
    comparisons: dict[tuple[str, str], Comparison]  # (model, contrast) -> comparison
    ranks: dict[str, RankReport]
    sweep_model: str
    sweep: list[SweepRow]
    claims: list[Claim]
    seconds: float = 0.0
    runs: dict[str, Path] = field(default_factory=dict)


def _train_config(config: DemoConfig, model: str, variant: str) -> TrainConfig:
    return make_train_config(
        dataset=config.dataset,
        data_dir=config.data_dir,
        model=model,
        epochs=config.epochs,
        train_samples=config.train_samples,
        seed=config.seed,
        device=config.device,
        out=config.out / f"{model}-{variant}",
        **VARIANTS[variant],
    )


def _ensure_run(tc: TrainConfig, overwrite: bool) -> Path:
    """Train unless ``tc.out`` already holds the same finished run."""
    ckpt = tc.out / MODEL_FILE
    if ckpt.is_file() and not overwrite:
        _, meta = read_metadata(ckpt)
        recorded = (meta or {}).get("train", {})
        wanted = tc.recorded()
        # an option a run's flatcli version did not have yet was at its default then
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        if all(
            recorded.get(k, defaults.get(k)) == v
            for k, v in wanted.items()
            if k not in ("model_kwargs", "augment")
        ):
            return tc.out
        raise RunExistsError(
            f"{tc.out} holds a run made with other settings",
            hint="pass --overwrite to retrain it, or --out to use another folder",
        )
    train(replace(tc, overwrite=True) if tc.out.exists() else tc)
    return tc.out


def run_demo(config: DemoConfig, on_step: Callable[[str], None] | None = None) -> DemoResult:
    import time

    step = on_step or (lambda message: None)
    start = time.perf_counter()
    sharp = SharpnessConfig(
        measures=DEMO_MEASURES, samples=config.measure_samples, probes=config.probes
    )
    if not config.models:
        raise UsageError("--models names no model", hint=f"choose from: {', '.join(MODELS)}")
    get_spec(config.dataset)
    # Every run's options are checked (names included) before the first one trains.
    planned = {
        f"{model}-{variant}": _train_config(config, model, variant)
        for model in config.models
        for variant in VARIANTS
    }
    for tc in planned.values():
        resolve_kwargs(tc.model, **tc.model_kwargs)
    runs: dict[str, Path] = {}
    for name, tc in planned.items():
        step(f"training {name}")
        runs[name] = _ensure_run(tc, config.overwrite)
    comparisons = {}
    for model in config.models:
        for a, b, title in CONTRASTS:
            step(f"measuring {model}: {title}")
            comparisons[(model, title)] = compare_checkpoints(
                [runs[f"{model}-{a}"], runs[f"{model}-{b}"]],
                sharp,
                data_dir=config.data_dir,
                device=config.device,
            )
    ranks = {}
    for model in config.models:
        step(f"rank of {model}")
        point = load_point(
            runs[f"{model}-sgd"],
            samples=config.measure_samples,
            data_dir=config.data_dir,
            device=config.device,
        )
        ranks[model] = rank_report(
            point.model,
            point.inputs,
            point.targets,
            int(point.info.dataset["num_classes"]),
            seed=config.seed,
        )
    sweep_model = config.models[
        0
    ]  # logistic regression by default: scaling it is exactly function-preserving
    step(f"scaling sweep of {sweep_model}-sgd")
    point = load_point(
        runs[f"{sweep_model}-sgd"],
        samples=config.measure_samples,
        data_dir=config.data_dir,
        device=config.device,
    )
    sweep = scaling_sweep(
        point.model,
        point.inputs,
        point.targets,
        config.sweep_scales,
        replace(sharp, measures=("lambda_max", "trace")),
    )
    claims = judge(comparisons, ranks, sweep_model, sweep)
    return DemoResult(
        config, comparisons, ranks, sweep_model, sweep, claims, time.perf_counter() - start, runs
    )


# ----------------------------------------------------------------------------------------
# The verdicts on the paper's claims, computed from the measurements


def _pair_claim(model: str, comparison: Comparison, claim: str) -> Claim:
    """Claim 'B is sharper (lambda_max) than A yet generalises better' on one pair."""
    v = next(v for v in comparison.verdicts if v.measure == "lambda_max")
    a, b = comparison.runs
    sharper = "tie" if v.sharpness_tie else ("B" if v.sharpness_ratio > 1 else "A")
    better = "tie" if v.accuracy_tie else ("B" if v.accuracy_difference_points > 0 else "A")
    evidence = (
        f"lambda_max {a.measures['lambda_max'].value:.4g} -> {b.measures['lambda_max'].value:.4g} "
        f"({v.sharpness_ratio:.2f}x), ||w|| {a.weight_norm:.3g} -> {b.weight_norm:.3g}, test accuracy "
        f"{a.test_accuracy:.2%} -> {b.test_accuracy:.2%}"
    )
    if not v.converged:  # no bound to call a difference by
        return Claim(
            claim, model, None, f"lambda_max did not converge (raise --max-iter); {evidence}"
        )
    if sharper == "B" and better == "B":
        return Claim(
            claim, model, True, f"held: {b.name} is sharper and generalises better; {evidence}"
        )
    if sharper == "B":
        what = "but its test accuracy ties" if better == "tie" else "but generalises worse"
        return Claim(
            claim,
            model,
            None if better == "tie" else False,
            f"{b.name} is sharper, {what}; {evidence}",
        )
    what = "ties on lambda_max" if sharper == "tie" else "is flatter"
    return Claim(claim, model, False, f"did not hold: {b.name} {what}; {evidence}")


def _sweep_claim(model: str, sweep: list[SweepRow]) -> Claim:
    rows = sorted(sweep, key=lambda r: r.scale)
    up = [r for r in rows if r.scale >= 1.0]
    same_acc = max(r.accuracy for r in rows) - min(r.accuracy for r in rows) < 1e-12
    flatter = all(
        b.measures["lambda_max"].value < a.measures["lambda_max"].value for a, b in zip(up, up[1:])
    )
    lower_loss = all(b.loss < a.loss for a, b in zip(up, up[1:]))
    desc = "; ".join(
        f"a={r.scale:g}: loss {r.loss:.3g}, lambda_max {r.measures['lambda_max'].value:.3g}, "
        f"accuracy {r.accuracy:.2%}"
        for r in (rows[0], rows[-1])
    )
    held = same_acc and flatter and len(up) > 1
    words = (
        "held: same predictions, lower lambda_max as the weights grow"
        + (
            ""
            if lower_loss
            else " (the loss did not fall monotonically: some training points are misclassified)"
        )
        if held
        else "did not hold on this sweep"
    )
    return Claim(
        "Larger weights with the same predictions look flatter (the mechanism)",
        model,
        held,
        f"{words}; {desc}",
    )


def _rank_claim(model: str, report: RankReport) -> Claim:
    m, b = report.measured, report.bound
    if m.exact:
        eff = m.effective_rank.get(1e-2, next(iter(m.effective_rank.values())))
        held = eff <= b.min_bound
        evidence = (
            f"effective rank (>1e-2 lambda_max) {eff:,}, numerical rank {m.numerical_rank:,}, bound "
            f"{b.min_bound:,} of P={b.num_params:,}"
        )
    else:
        held = (
            m.value - 2 * m.stderr <= b.min_bound
            if math.isfinite(m.stderr)
            else m.value <= b.min_bound
        )
        evidence = (
            f"estimated effective rank {m.value:,.0f} ± {m.stderr:,.0f}, bound {b.min_bound:,} of "
            f"P={b.num_params:,}"
        )
    return Claim(
        "Hessian rank is bounded by about neurons x classes",
        model,
        held,
        ("held: " if held else "did not hold: ") + evidence,
    )


def judge(comparisons: dict, ranks: dict, sweep_model: str, sweep: list[SweepRow]) -> list[Claim]:
    claims = []
    for (model, title), comparison in comparisons.items():
        text = (
            "L2-regularised solutions are sharper yet generalise better"
            if title == "L2 regularisation"
            else "Gadam (AdamW + averaging) is sharper than SGD yet generalises better"
        )
        claims.append(_pair_claim(model, comparison, text))
    claims.append(_sweep_claim(sweep_model, sweep))
    claims.extend(_rank_claim(model, report) for model, report in ranks.items())
    return claims


def demo_as_dict(result: DemoResult) -> dict[str, Any]:
    from flatcli.workflows.compare import comparison_as_dict

    return {
        "dataset": result.config.dataset,
        "models": list(result.config.models),
        "runs": {k: str(v) for k, v in result.runs.items()},
        "comparisons": [
            {"model": m, "contrast": t, **comparison_as_dict(c)}
            for (m, t), c in result.comparisons.items()
        ],
        "rank": {m: r.as_dict() for m, r in result.ranks.items()},
        "sweep": {"model": result.sweep_model, "rows": [r.as_dict() for r in result.sweep]},
        "claims": [c.__dict__ for c in result.claims],
        "seconds": result.seconds,
    }
