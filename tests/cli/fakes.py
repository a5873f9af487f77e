"""Fixed results for the command tests: built by hand, so that what a command prints
depends on the renderer alone.
"""

from __future__ import annotations

from pathlib import Path

from flatcli.analysis.claims import Claim
from flatcli.analysis.rank import MeasuredRank, RankBound, RankEstimate, RankReport
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


def run(name: str, accuracy: float, lambda_max: float, **changes: object) -> RunSummary:
    """A trained run with one measure."""
    fields: dict = dict(
        name=name,
        optimizer="sgd",
        l2=0.0,
        weight_decay=0.0,
        averaging=None,
        train_loss=0.1,
        test_loss=0.3,
        test_accuracy=accuracy,
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
