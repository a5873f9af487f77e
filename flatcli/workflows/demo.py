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

With ``seeds`` N > 1 each variant is trained with the seeds ``seed .. seed + N - 1``: the
first seed's run is ``out/MODEL-VARIANT`` (the folder a one-seed demo uses, so those runs
are reused), the others ``out/MODEL-VARIANT-sSEED``; each contrast is then judged arm
against arm, on the means over the seeds and their spread
(:func:`flatcli.workflows.compare.compare_checkpoints`, :mod:`flatcli.analysis.seeds`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flatcli.analysis.claims import Claim, judge
from flatcli.analysis.progress import ProgressCallback, Tick
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
from flatcli.workflows.training import TrainCallbacks, train

__all__ = [
    "CONTRASTS",
    "VARIANTS",
    "DemoResult",
    "arm_runs",
    "ensure_run",
    "existing_run",
    "run_demo",
    "run_name",
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


def run_name(config: DemoConfig, model: str, variant: str, seed: int | None = None) -> str:
    """The folder of ``model``'s ``variant`` trained with ``seed`` (default: the first seed):
    ``MODEL-VARIANT`` for the first seed, ``MODEL-VARIANT-sSEED`` for the others.
    """
    seed = config.seed if seed is None else seed
    return f"{model}-{variant}" + ("" if seed == config.seed else f"-s{seed}")


def arm_runs(config: DemoConfig, model: str, variant: str) -> list[str]:
    """The runs (folder names) of one arm: ``model``'s ``variant`` with each of the seeds."""
    return [
        run_name(config, model, variant, seed)
        for seed in range(config.seed, config.seed + config.seeds)
    ]


def variant_config(
    config: DemoConfig, model: str, variant: str, seed: int | None = None
) -> TrainConfig:
    """The training settings of ``model``'s run ``variant`` (see :data:`VARIANTS`) with
    ``seed`` (default: the demo's first seed), in :func:`run_name`'s folder.
    """
    seed = config.seed if seed is None else seed
    return make_train_config(
        dataset=config.dataset,
        data_dir=config.data_dir,
        model=model,
        epochs=config.epochs,
        train_samples=config.train_samples,
        seed=seed,
        device=config.device,
        out=config.out / run_name(config, model, variant, seed),
        **VARIANTS[variant],
    )


def ensure_run(
    tc: TrainConfig, overwrite: bool, *, callbacks: TrainCallbacks | None = None
) -> Path:
    """Train (with ``callbacks``) unless ``tc.out`` already holds the same finished run
    (:func:`existing_run`); return ``tc.out``.
    """
    reuse = existing_run(tc, overwrite)  # refuses a config without an output folder
    out = tc.out
    assert out is not None
    if not reuse:
        train(replace(tc, overwrite=True) if out.exists() else tc, callbacks)
    return out


def existing_run(tc: TrainConfig, overwrite: bool) -> bool:
    """Whether ``tc.out`` already holds the same finished run, to be reused, not trained.

    A run recorded before an option existed was made at that option's default. A
    different run there is refused (:class:`~flatcli.errors.RunExistsError`) unless
    ``overwrite`` (then False: it is to be trained again).
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
            return True
        raise RunExistsError(
            f"{out} holds a run made with other settings",
            hint="pass --overwrite to retrain it, or --out to use another folder",
        )
    return False


def run_demo(
    config: DemoConfig,
    on_step: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    """Train (or reuse) every run, compare the contrasts, measure the ranks and the sweep,
    and judge the claims; ``on_step`` hears one line before each stage (whether a run is
    reused or trained) and, after each comparison, whose sharpness was cached or measured;
    ``progress`` the tasks within (each run's epochs, each measurement's products).
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
        run_name(config, model, variant, seed): variant_config(config, model, variant, seed)
        for model in config.models
        for variant in VARIANTS
        for seed in range(config.seed, config.seed + config.seeds)
    }
    for tc in planned.values():
        resolve_kwargs(tc.model, **tc.model_kwargs)
    runs: dict[str, Path] = {}
    for name, tc in planned.items():
        reuse = existing_run(tc, config.overwrite)
        step(f"reusing {name} (trained before)" if reuse else f"training {name}")
        epochs = TrainCallbacks.ticking(progress, f"training {name}")
        runs[name] = ensure_run(tc, config.overwrite, callbacks=epochs)
    source = CheckpointSource(data_dir=config.data_dir, device=config.device)
    comparisons = {}
    for model in config.models:
        for a, b, title in CONTRASTS:
            step(f"comparing {model}: {title}")
            notes: dict[str, str] = {}
            arms = [[runs[n] for n in arm_runs(config, model, v)] for v in (a, b)]
            comparisons[(model, title)] = compare_checkpoints(
                [arm[0] if len(arm) == 1 else arm for arm in arms],
                sharp,
                source,
                progress=_noting(progress, notes),
            )
            step(", ".join(f"{run}: sharpness {note}" for run, note in notes.items()))
    ranks = {}
    for model in config.models:
        step(f"rank of {model}")
        ranks[model] = rank_checkpoint(
            runs[f"{model}-sgd"],
            source,
            samples=config.measure_samples,
            seed=config.seed,
            progress=progress,
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
        progress=progress,
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


def _noting(progress: ProgressCallback | None, notes: dict[str, str]) -> ProgressCallback:
    """``progress`` (if any), keeping in ``notes`` what each run's sharpness task ended
    with: ``"cached"`` or ``"measured"`` (see :func:`flatcli.analysis.progress.cache_note`).
    """

    def hear(tick: Tick) -> None:
        run, _, what = tick.task.rpartition(": ")
        if tick.finished and what == "sharpness" and run:
            notes[run] = tick.note
        if progress is not None:
            progress(tick)

    return hear
