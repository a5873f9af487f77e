"""The Hessian rank bound of Granziol (2020) and the ranks measured against it.

Specification:
- the bound is (C-1) * sum over layers of (fan_in + 1), with BatchNorm counted as a
  layer of fan-in 1 and residual additions not counted;
- for logistic regression the exact Hessian rank never exceeds the bound, attains it
  for generic data, and equals (C-1) * rank([X, 1]) in general;
- for a deep linear net the GGN obeys the bound; the Hessian's residual term can push
  the exact rank above it away from a stationary point (a finding, asserted as such);
- numerical and effective ranks count |eigenvalues| above a relative threshold;
- the SLQ rank estimate is P times the quadrature mass above the cut, per probe.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from flatcli.analysis.rank import (
    MeasuredRank,
    RankEstimate,
    default_rank_threshold,
    effective_rank,
    estimated_rank,
    is_linear_model,
    measured_rank,
    numerical_rank,
    rank_bound,
    rank_report,
)
from flatcli.curvature import CurvatureOperator, slq_density
from flatcli.errors import TooLargeError, UsageError
from flatcli.models import build_model
from flatcli.models.factory import LogitsOf
from flatcli.report.text import rank_as_dict, rank_statement
from flatcli.workflows.data import load_dataset

C, D = 10, 64  # digits: 10 classes, 8 x 8 inputs


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("digits", "train").tensors
    return x[:200], y[:200]


@pytest.fixture(scope="module")
def random_data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(300, 1, 8, 8, generator=gen), torch.randint(0, C, (300,), generator=gen)


@pytest.fixture(scope="module")
def logreg_random_rank(random_data):
    return measured_rank(logreg(), *random_data)


def logreg():
    torch.manual_seed(0)
    return build_model("logreg", input_shape=(1, 8, 8), num_classes=C)


def deep_linear(hidden=12):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, hidden), nn.Linear(hidden, C))


# ---------------------------------------------------------------------------- the bound


def test_logreg_bound_is_c_minus_1_times_d_plus_1():
    b = rank_bound(logreg(), C, 200)
    assert b.paper_bound == (C - 1) * (D + 1) == 585
    assert b.data_bound == 200 * (C - 1)
    assert b.num_params == D * C + C == 650
    assert b.min_bound == 585
    assert b.bound_fraction == pytest.approx(585 / 650)
    assert b.paper_fraction == pytest.approx(585 / 650)
    assert b.data_fraction == pytest.approx(1800 / 650)


def test_data_bound_wins_with_few_samples():
    b = rank_bound(logreg(), C, 20)
    assert (b.data_bound, b.min_bound) == (180, 180)
    assert b.bound_fraction == pytest.approx(180 / 650)


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("logreg", {}, [("fc", "linear", 64, 10)]),
        ("mlp", {"width": 16}, [("hidden.0", "linear", 64, 16), ("head", "linear", 16, 10)]),
        (
            "cnn",
            {"channels": 4},
            [
                ("features.0", "conv", 1 * 9, 4),
                ("features.3", "conv", 4 * 9, 8),
                ("fc", "linear", 8, 10),
            ],
        ),
        (
            "cnn",
            {"channels": 4, "batchnorm": True},
            [
                ("features.0", "conv", 9, 4),
                ("features.1", "batchnorm", 1, 4),
                ("features.4", "conv", 36, 8),
                ("features.5", "batchnorm", 1, 8),
                ("fc", "linear", 8, 10),
            ],
        ),
    ],
)
def test_fan_ins_and_bound_of_the_zoo(name, kwargs, expected):
    model = build_model(name, input_shape=(1, 8, 8), num_classes=C, **kwargs)
    b = rank_bound(model, C, 1000)
    assert [(i.name, i.kind, i.fan_in, i.neurons) for i in b.layers] == expected
    assert b.paper_bound == (C - 1) * sum(fan_in + 1 for _, _, fan_in, _ in expected)
    assert b.num_params == sum(p.numel() for p in model.parameters())


def test_residual_connections_add_nothing_to_the_bound():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(x + self.inner(x))

    assert rank_bound(Residual(), 3, 100).paper_bound == (3 - 1) * ((8 + 1) + (8 + 1))


# --------------------------------------------------------------------- exact ranks: linear


def test_logreg_rank_attains_the_bound_on_generic_data(logreg_random_rank):
    r = logreg_random_rank
    assert r.exact and r.num_params == 650
    assert r.numerical_rank == r.ggn_rank == 585  # H = GGN; generic data: bound attained


def test_logreg_rank_on_digits_is_c_minus_1_times_data_rank(digits):
    x, y = digits
    r = measured_rank(logreg(), x, y)
    augmented = torch.cat(
        [x.flatten(1).double(), torch.ones(len(y), 1, dtype=torch.float64)], dim=1
    )
    data_rank = int(torch.linalg.matrix_rank(augmented))
    assert data_rank < D + 1  # some digits pixels are always 0
    assert r.numerical_rank == r.ggn_rank == (C - 1) * data_rank
    assert r.numerical_rank <= rank_bound(logreg(), C, len(y)).min_bound


def test_deep_linear_ggn_obeys_the_bound_but_hessian_can_exceed_it(random_data, digits):
    h = 12
    model = deep_linear(h)
    paper = rank_bound(model, C, 300).paper_bound
    assert paper == (C - 1) * ((D + 1) + (h + 1)) == 702
    ranks = {
        name: measured_rank(model, *data)
        for name, data in (("random", random_data), ("digits", digits))
    }
    for r in ranks.values():
        # GGN: range within that of the end-to-end logistic regression
        assert r.ggn_rank <= (C - 1) * (D + 1) <= paper
        # Hessian = GGN + residual coupling of the layers (rank <= 2 (C-1) h)
        assert r.numerical_rank <= (C - 1) * (D + 1) + 2 * (C - 1) * h
    # Away from a stationary point the paper's bound fails for the exact Hessian rank
    # (on digits, whose inputs span fewer dimensions, it happens to hold):
    r = ranks["random"]
    assert r.numerical_rank > paper
    text = rank_statement(rank_bound(model, C, 300), r, is_linear_model(model))
    assert f"{r.numerical_rank:,}" in text and "residual" in text and "WARNING" not in text


def test_measured_rank_does_not_touch_the_model(digits):
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured_rank(model, *digits)
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_too_large_model_is_refused_with_size_and_hint():
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=C)  # 50,890 parameters
    with pytest.raises(TooLargeError) as info:
        measured_rank(model, torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    assert "50,890" in info.value.message and "GiB" in info.value.message
    assert "--estimate" in info.value.hint


# ------------------------------------------------------------------ ranks of a spectrum


def test_numerical_rank_counts_magnitudes_above_p_eps():
    eigs = np.array([2.0, -0.5, 1e-6, 1e-12, 3e-15, -1e-16, 0.0, 0.0, 0.0, 0.0])
    # default: 10 * 2.2e-16 * 2 = 4.4e-15 absolute
    assert default_rank_threshold(10) == pytest.approx(10 * np.finfo(np.float64).eps)
    assert numerical_rank(eigs) == 4
    assert numerical_rank(eigs, rel_threshold=1e-7) == 3
    assert numerical_rank(eigs, rel_threshold=0.0) == 6
    assert numerical_rank(torch.tensor(eigs)) == 4
    assert numerical_rank(np.zeros(5)) == 0


def test_effective_rank_per_fraction():
    eigs = [10.0, 3.0, 0.5, -0.2, 0.05, 0.009, 0.0]
    # cuts at 0.1 and 0.01 of lambda_max = 10; -0.2 counts by its magnitude
    assert effective_rank(eigs) == {0.01: 4, 0.001: 5}
    assert effective_rank(eigs, fractions=(0.1,)) == {0.1: 2}


# ------------------------------------------------------------------- the SLQ estimate


def test_estimated_rank_from_constructed_quadrature():
    # probe 1: 4 nodes, mass 0.3 above 0.01 * 1.0; probe 2: 3 nodes, mass 0.5 above it
    density = types.SimpleNamespace(
        nodes=torch.tensor([0.0, 0.001, 0.5, 1.0, -0.002, 0.2, 0.9], dtype=torch.float64),
        weights=torch.tensor([0.6, 0.1, 0.2, 0.1, 0.5, 0.25, 0.25], dtype=torch.float64),
        probes=2,
    )
    est = estimated_rank(density, num_params=100, fraction=1e-2)
    assert isinstance(est, RankEstimate) and est.exact is False
    assert est.value == pytest.approx(40.0)  # mean of 30 and 50
    assert est.stderr == pytest.approx(np.std([30.0, 50.0], ddof=1) / np.sqrt(2))
    # a cut above 0.5 leaves probe 1 with 0.1 and probe 2 with 0.25 (nodes 0.9 only)
    assert estimated_rank(density, 100, fraction=0.6).value == pytest.approx(17.5)


def test_estimated_rank_of_a_real_slq_density_matches_the_exact_rank(
    random_data, logreg_random_rank
):
    op = CurvatureOperator(logreg(), *random_data, dtype=torch.float64)
    density = slq_density(op, probes=8, iterations=12, seed=0)
    est = estimated_rank(density, op.num_params, fraction=1e-2)
    exact = logreg_random_rank.effective_rank[0.01]  # 585, with a clear gap down to 0
    assert abs(est.value - exact) <= 4 * est.stderr + 1e-9
    assert est.stderr < 0.05 * exact


# ------------------------------------------------------------------ statements


def test_is_linear_model():
    assert is_linear_model(logreg())
    assert is_linear_model(deep_linear())
    assert is_linear_model(build_model("mlp", input_shape=(1, 8, 8), num_classes=C, depth=0))
    assert not is_linear_model(build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=16))
    assert not is_linear_model(build_model("cnn", input_shape=(1, 8, 8), num_classes=C, channels=4))
    assert not is_linear_model(
        nn.Sequential(nn.Flatten(), nn.Linear(D, 4), nn.ReLU(), nn.Linear(4, C))
    )


def test_a_wrapped_factory_model_is_linear_when_the_users_model_is():
    assert is_linear_model(LogitsOf(logreg()))
    assert is_linear_model(LogitsOf(deep_linear()))
    assert not is_linear_model(
        LogitsOf(build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=4))
    )


def test_an_estimate_from_one_probe_has_no_error_bar():
    density = types.SimpleNamespace(
        nodes=torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64),
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        probes=1,
    )
    est = estimated_rank(density, num_params=10, fraction=0.1)
    assert est.value == pytest.approx(5.0) and np.isnan(est.stderr)
    with pytest.raises(UsageError, match="split"):
        estimated_rank(types.SimpleNamespace(**{**vars(density), "probes": 2}), 10)


# ------------------------------------------------------------------ the report


def test_rank_report_of_logreg_is_exact_and_its_document_carries_the_statement(random_data):
    x, y = random_data
    report = rank_report(logreg(), x, y, C)
    assert report.is_linear and isinstance(report.measured, MeasuredRank)
    assert report.bound == rank_bound(logreg(), C, len(y))
    assert report.measured == measured_rank(logreg(), x, y)
    doc = rank_as_dict(report)
    assert (doc["paper_bound"], doc["numerical_rank"], doc["ggn_rank"]) == (585, 585, 585)
    assert doc["exact"] is True and doc["linear_model"] is True
    assert doc["effective_rank"] == [
        {"fraction": k, "value": v, "uncertainty": 0.0, "kind": "exact", "converged": True}
        for k, v in report.measured.effective_rank.items()
    ]
    assert doc["statement"] == rank_statement(report.bound, report.measured, True)
    assert list(doc)[-2:] == ["statement", "provenance"]


def test_rank_report_estimates_above_max_params(random_data):
    x, y = random_data
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=4)
    report = rank_report(model, x, y, C, max_params=100, seed=3)
    assert not report.is_linear and isinstance(report.measured, RankEstimate)
    assert report.measured.num_params == sum(p.numel() for p in model.parameters())
    doc = rank_as_dict(report)
    assert doc["exact"] is False and doc["numerical_rank"] is None and doc["ggn_rank"] is None
    assert doc["effective_rank"] == [
        {
            "fraction": 0.01,
            "value": report.measured.value,
            "uncertainty": report.measured.stderr,
            "kind": "stderr",
            "converged": False,  # a standard error of RANK_PROBES = 8 < MIN_SAMPLES probes
        }
    ]


def _measured(rank, ggn):
    return MeasuredRank(
        num_params=650,
        num_samples=200,
        threshold=1e-13,
        numerical_rank=rank,
        ggn_rank=ggn,
        effective_rank={0.01: 71},
        ggn_effective_rank={0.01: 71},
        lambda_max=1.8,
        lambda_min=0.0,
    )


def test_statement_for_a_linear_model_reports_the_numbers():
    b = rank_bound(logreg(), C, 200)
    text = rank_statement(b, _measured(522, 522), True)
    assert "585" in text and "522" in text and "71" in text and "exact" in text
    assert "WARNING" not in text


def test_statement_is_loud_when_a_linear_model_exceeds_its_bound():
    b = rank_bound(logreg(), C, 200)
    text = rank_statement(b, _measured(600, 600), True)
    assert "WARNING" in text and "EXCEEDS" in text and "600" in text


def test_statement_for_a_nonlinear_model_names_the_approximation():
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=16)
    b = rank_bound(model, C, 300)
    m = MeasuredRank(
        num_params=1210,
        num_samples=300,
        threshold=2.7e-13,
        numerical_rank=1193,
        ggn_rank=1177,
        effective_rank={0.01: 865},
        ggn_effective_rank={0.01: 762},
        lambda_max=0.29,
        lambda_min=-0.15,
    )
    text = rank_statement(b, m, is_linear_model(model))
    assert "Kronecker" in text and "effective" in text
    assert "1,193" in text and f"exceeds it by {1193 - b.paper_bound:,}" in text


def test_statement_for_an_estimate_says_estimate():
    b = rank_bound(logreg(), C, 200)
    est = RankEstimate(value=581.9, stderr=3.9, fraction=0.01, probes=16, num_params=650)
    text = rank_statement(b, est, True)
    assert "estimate" in text.lower() and "581.9" in text and "WARNING" not in text
    far = RankEstimate(value=640.0, stderr=3.0, fraction=0.01, probes=16, num_params=650)
    assert "WARNING" in rank_statement(b, far, True)
