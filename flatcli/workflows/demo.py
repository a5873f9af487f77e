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

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flatcli.analysis.claims import Claim, judge
from flatcli.analysis.rank import RankReport
from flatcli.analysis.sweep import SweepRow, scaling_sweep
from flatcli.analysis.verdicts import Comparison
from flatcli.config import (
    DEFAULT_COMPARE_MEASURES,
    DemoConfig,
    SharpnessConfig,
    TrainConfig,
    make_train_config,
)
from flatcli.errors import RunExistsError, UsageError
from flatcli.models import MODELS, resolve_kwargs
from flatcli.workflows.checkpoint import MODEL_FILE, read_metadata
from flatcli.workflows.compare import compare_checkpoints
from flatcli.workflows.data import get_spec
from flatcli.workflows.provenance import Provenance, provenance
from flatcli.workflows.rank import rank_checkpoint
from flatcli.workflows.sharpness import load_point
from flatcli.workflows.source import CheckpointSource
from flatcli.workflows.training import train

__all__ = [
    "CONTRASTS",
    "VARIANTS",
    "DemoResult",
    "ensure_run",
    "run_demo",
    "variant_config",
]

#: Variants of each model: name -> options of make_train_config (besides model and data).
VARIANTS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd", "lr": 0.05},
    "sgd-l2": {"optimizer": "sgd", "lr": 0.05, "l2": 5e-3},
    "gadam": {"recipe": "gadam", "lr": 0.01},
}
#: The two contrasts: (variant A, variant B, title); each title names its claim in
#: :data:`flatcli.analysis.claims.CONTRAST_CLAIMS`.
CONTRASTS = (("sgd", "sgd-l2", "L2 regularisation"), ("sgd", "gadam", "Gadam vs SGD"))


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo measured, the claims judged on it, and the runs it used.

    ``comparisons`` is keyed by (model, contrast title); ``ranks`` by model; ``sweep`` is
    of ``sweep_model``'s ``sgd`` run; ``seconds`` the wall-clock time of the whole demo.
    """

    config: DemoConfig
    comparisons: dict[tuple[str, str], Comparison]  # (model, contrast) -> comparison
    ranks: dict[str, RankReport]
    sweep_model: str
    sweep: list[SweepRow]
    claims: list[Claim]
    seconds: float = 0.0
    runs: dict[str, Path] = field(default_factory=dict)
    #: What the demo measured with (:func:`~flatcli.workflows.provenance.provenance`).
    provenance: Provenance | None = None


def variant_config(config: DemoConfig, model: str, variant: str) -> TrainConfig:
    """The training settings of ``model``'s run ``variant`` (see :data:`VARIANTS`)."""
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


def ensure_run(tc: TrainConfig, overwrite: bool) -> Path:
    """Train unless ``tc.out`` already holds the same finished run; return ``tc.out``.

    A run recorded before an option existed was made at that option's default. A
    different run there is refused (:class:`~flatcli.errors.RunExistsError`) unless
    ``overwrite``.
    """
    out = tc.out
    if out is None:
        raise UsageError("a demo run needs an output folder (out)")
    ckpt = out / MODEL_FILE
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
            return out
        raise RunExistsError(
            f"{out} holds a run made with other settings",
            hint="pass --overwrite to retrain it, or --out to use another folder",
        )
    train(replace(tc, overwrite=True) if out.exists() else tc)
    return out


def run_demo(config: DemoConfig, on_step: Callable[[str], None] | None = None) -> DemoResult:
    """Train (or reuse) every run, compare the contrasts, measure the ranks and the sweep,
    and judge the claims; ``on_step`` hears one line before each stage.
    """
    step = on_step or (lambda message: None)
    start = time.perf_counter()
    sharp = SharpnessConfig(
        measures=DEFAULT_COMPARE_MEASURES, samples=config.measure_samples, probes=config.probes
    )
    if not config.models:
        raise UsageError("--models names no model", hint=f"choose from: {', '.join(MODELS)}")
    get_spec(config.dataset)
    # Every run's options are checked (names included) before the first one trains.
    planned = {
        f"{model}-{variant}": variant_config(config, model, variant)
        for model in config.models
        for variant in VARIANTS
    }
    for tc in planned.values():
        resolve_kwargs(tc.model, **tc.model_kwargs)
    runs: dict[str, Path] = {}
    for name, tc in planned.items():
        step(f"training {name}")
        runs[name] = ensure_run(tc, config.overwrite)
    source = CheckpointSource(data_dir=config.data_dir, device=config.device)
    comparisons = {}
    for model in config.models:
        for a, b, title in CONTRASTS:
            step(f"measuring {model}: {title}")
            comparisons[(model, title)] = compare_checkpoints(
                [runs[f"{model}-{a}"], runs[f"{model}-{b}"]], sharp, source
            )
    ranks = {}
    for model in config.models:
        step(f"rank of {model}")
        ranks[model] = rank_checkpoint(
            runs[f"{model}-sgd"], source, samples=config.measure_samples, seed=config.seed
        )
    sweep_model = config.models[
        0
    ]  # logistic regression by default: scaling it is exactly function-preserving
    step(f"scaling sweep of {sweep_model}-sgd")
    point = load_point(runs[f"{sweep_model}-sgd"], source, samples=config.measure_samples)
    sweep = scaling_sweep(
        point.model,
        point.inputs,
        point.targets,
        config.sweep_scales,
        replace(sharp, measures=("lambda_max", "trace")),
    )
    claims = judge(comparisons, ranks, sweep_model, sweep)
    return DemoResult(
        config,
        comparisons,
        ranks,
        sweep_model,
        sweep,
        claims,
        time.perf_counter() - start,
        runs,
        provenance(next(point.model.parameters()).device),
    )
