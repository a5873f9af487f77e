"""Fixed results for the command tests: built by hand, so that what a command prints
depends on the renderer alone.
"""

from __future__ import annotations

from pathlib import Path

from flatcli.analysis.claims import CONTRAST_CLAIMS, Claim, judge
from flatcli.analysis.rank import MeasuredRank, RankBound, RankEstimate, RankReport
from flatcli.analysis.sharpness_report import Density, SharpnessReport
from flatcli.analysis.sweep import SweepRow
from flatcli.analysis.verdicts import Comparison, RunSummary, compare
from flatcli.config import DemoConfig
from flatcli.curvature.results import Estimate
from flatcli.models.registry import LayerInfo
from flatcli.workflows.demo import DemoResult

BOUND = RankBound(
    layers=(LayerInfo("fc", "linear", fan_in=4, neurons=3, has_bias=True, params=15),),
    num_classes=3,
    num_samples=10,
    num_params=15,
    paper_bound=10,
    data_bound=20,
    min_bound=10,
    paper_fraction=10 / 15,
    data_fraction=20 / 15,
    bound_fraction=10 / 15,
)
EXACT_RANK = RankReport(
    bound=BOUND,
    measured=MeasuredRank(
        num_params=15,
        num_samples=10,
        threshold=1e-12,
        numerical_rank=8,
        ggn_rank=8,
        effective_rank={0.01: 6},
        ggn_effective_rank={0.01: 6},
        lambda_max=2.0,
        lambda_min=-0.1,
    ),
    is_linear=True,
)
ESTIMATED_RANK = RankReport(
    bound=BOUND,
    measured=RankEstimate(value=7.4, stderr=0.6, fraction=0.01, probes=8, num_params=15),
    is_linear=False,
)


def run(name: str, test_accuracy: float, lambda_max: float, **changes: object) -> RunSummary:
    """A trained run with one measure."""
    fields: dict = dict(
        name=name,
        optimizer="sgd",
        l2=0.0,
        weight_decay=0.0,
        averaging=None,
        train_loss=0.1,
        test_loss=0.3,
        test_accuracy=test_accuracy,
        train_accuracy=1.0,
        weight_norm=4.0,
        measures={"lambda_max": Estimate(value=lambda_max, uncertainty=0.01, kind="bound")},
        test_size=1000,
    )
    fields.update(changes)
    return RunSummary(**fields)


COMPARISON: Comparison = compare(
    [run("sgd", 0.8, 2.0), run("sgd-l2", 0.9, 4.0, l2=5e-4, weight_norm=2.0, test_loss=0.2)]
)

SWEEP = [
    SweepRow(
        scale=a,
        loss=0.5 / a,
        accuracy=0.9,
        weight_norm=2.0 * a,
        measures={"lambda_max": Estimate(value=1.0 / a, uncertainty=0.001, kind="bound")},
    )
    for a in (1.0, 2.0)
]

DEMO = DemoResult(
    config=DemoConfig(models=("logreg",), out=Path("runs/demo/digits")),
    comparisons={("logreg", "L2 regularisation"): COMPARISON},
    ranks={"logreg": EXACT_RANK},
    sweep_model="logreg",
    sweep=SWEEP,
    claims=[
        Claim(claim="L2 makes the model sharper", model="logreg", held=True, evidence="4 vs 2"),
        Claim(claim="a tie", model="logreg", held=None, evidence="[within] the noise"),
    ],
    seconds=12.0,
    runs={"logreg-sgd": Path("runs/demo/digits/logreg-sgd")},
)

#: The measures ``flatcli compare`` judges by default, in their order.
SEVEN = (
    "lambda_max",
    "trace",
    "frobenius",
    "lambda_max_normalised",
    "trace_normalised",
    "adaptive_sharpness",
    "relative_flatness",
)


def seven(name: str, accuracy: float, values: tuple[float, ...], converged: bool = True):
    """A run with the seven default measures (uncertainty 0.01 each)."""
    measures = {
        m: Estimate(value=v, uncertainty=0.01, kind="bound", converged=converged)
        for m, v in zip(SEVEN, values, strict=True)
    }
    return run(name, accuracy, 1.0, measures=measures)


#: Four runs on seven measures: every kind of verdict cell (sharper, flatter, agrees,
#: disagrees, accuracy tie, sharpness tie, not converged) and a long run name.
WIDE_COMPARISON: Comparison = compare(
    [
        seven("sgd", 0.9, (1, 2, 3, 4, 5, 6, 7)),
        seven("sgd-l2", 0.93, (2.4, 2, 1, 8, 5.5, 3, 70)),
        seven("gadam-averaged", 0.902, (1.2, 4, 3.01, 4, 5, 6, 7)),
        seven("x", 0.8, (1, 2, 3, 4, 5, 6, 7), converged=False),
    ]
)

#: The default demo's shape: three models, two contrasts each, their claims as judged.
_FULL_COMPARISONS = {(m, t): COMPARISON for m in ("logreg", "mlp", "cnn") for t in CONTRAST_CLAIMS}
_FULL_RANKS = {m: EXACT_RANK for m in ("logreg", "mlp", "cnn")}
FULL_DEMO = DemoResult(
    config=DemoConfig(out=Path("runs/demo/digits")),
    comparisons=_FULL_COMPARISONS,
    ranks=_FULL_RANKS,
    sweep_model="mlp",
    sweep=SWEEP,
    claims=judge(_FULL_COMPARISONS, _FULL_RANKS, "mlp", SWEEP),
    seconds=95.0,
    runs={f"{m}-{o}": Path(f"runs/demo/digits/{m}-{o}") for m in _FULL_RANKS for o in "abc"},
)


#: The runs table of COMPARISON at 100 columns, below its title (compare and demo print it).
RUNS_TABLE_ROWS = (
    "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━┓\n"
    "┃                             ┃              sgd ┃           sgd-l2 ┃\n"
    "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━┩\n"
    "│ optimiser                   │              sgd │              sgd │\n"
    "│ l2 (coupled)                │                0 │           0.0005 │\n"
    "│ weight decay (decoupled)    │                0 │                0 │\n"
    "│ averaging from epoch        │                - │                - │\n"
    "│ train loss                  │              0.1 │              0.1 │\n"
    "│ test loss                   │      0.3 (1.00x) │      0.2 (0.67x) │\n"
    "│ test accuracy               │           80.00% │           90.00% │\n"
    "│ generalisation gap (points) │            20.00 │            10.00 │\n"
    "│ ||w||                       │        4 (1.00x) │        2 (0.50x) │\n"
    "│ lambda_max                  │ 2 ± 0.01 (1.00x) │ 4 ± 0.01 (2.00x) │\n"
    "└─────────────────────────────┴──────────────────┴──────────────────┘\n"
)


DENSITY = Density(grid=[-1.0, 0.0, 1.0, 2.0], values=[0.0, 0.5, 0.5, 0.0])
LAMBDA_MAX = Estimate(value=1.5, uncertainty=0.001, kind="bound", hvps=8)


def sharpness_report(**changes: object) -> SharpnessReport:
    """A fixed report: both ends of the spectrum, trace and Frobenius norm, a density."""
    fields: dict = dict(
        checkpoint="run/model.safetensors",
        dataset="digits",
        split="train",
        num_samples=200,
        num_params=650,
        curvature="hessian",
        bn_mode="eval",
        dtype="float32",
        device="cpu",
        seed=0,
        loss=1.25,
        accuracy=0.875,
        weight_norm=3.5,
        l2=0.0,
        measures={
            "lambda_max": LAMBDA_MAX,
            "lambda_min": Estimate(
                value=-0.25,
                uncertainty=0.5,
                kind="bound",
                converged=False,
                shared_with=("lambda_max",),
            ),
            "trace": Estimate(value=13.0, uncertainty=0.04, kind="stderr", hvps=99),
            "frobenius": Estimate(
                value=3.25, uncertainty=0.0003, kind="stderr", shared_with=("trace",)
            ),
            "density": DENSITY,
        },
        hvps=107,
        seconds=1.5,
    )
    fields.update(changes)
    return SharpnessReport(**fields)
