"""Trace (block Krylov Hutch++, Hutchinson) and Frobenius estimators: within 4 standard
errors of the exact values with fixed seeds, standard errors that shrink with more
probes, the advertised costs (HVPs and data passes), and trace and Frobenius norm from
the same products.

The coverage tests use 20 Hutchinson samples: with 10, the sample standard deviation of
the skewed terms g^T B g is itself noisy enough that |error| > 4 stderr happened for
1-3% of seeds (measured over 300 seeds); with 20 it did in 0-1.3%.
"""

from __future__ import annotations

import pytest
import torch

from flatcli.curvature import (
    CurvatureOperator,
    frobenius,
    hutchinson_trace,
    hutchpp_trace,
    trace_and_frobenius,
)
from flatcli.curvature.probes import gaussian, generator, rademacher
from flatcli.curvature.trace import DEPTH
from flatcli.errors import UsageError

F64 = torch.float64
SEEDS = range(5)
PROBLEMS = [("logreg", "digits"), ("mlp_tanh", "digits"), ("bn_cnn", "random")]


def setup(make_problem, reference_hessian, kind: str, dataset: str, **kwargs):
    problem = make_problem(kind, dataset)
    passes: list[int] = []
    op = CurvatureOperator(
        problem.model, problem.inputs, problem.targets, dtype=F64, progress=passes.append, **kwargs
    )
    return op, reference_hessian(problem), passes


@pytest.mark.parametrize("kind, dataset", PROBLEMS)
def test_hutchpp_within_4_stderr_of_the_exact_trace(
    make_problem, reference_hessian, kind: str, dataset: str
) -> None:
    op, dense, passes = setup(make_problem, reference_hessian, kind, dataset)
    exact = float(torch.trace(dense))
    for seed in SEEDS:
        est = hutchpp_trace(op, probes=60, seed=seed)
        assert est.uncertainty > 0
        assert abs(est.value - exact) <= 4 * est.uncertainty, (seed, est, exact)
    assert (
        est.hvps == 60 and est.samples == 30 and est.kind == "stderr"
    )  # 3 blocks of 10, 30 samples
    assert len(passes) == DEPTH * len(SEEDS)  # one data pass per Krylov step, samples on the last


@pytest.mark.parametrize("kind, dataset", PROBLEMS)
def test_hutchinson_within_4_stderr_of_the_exact_trace(
    make_problem, reference_hessian, kind: str, dataset: str
) -> None:
    op, dense, passes = setup(make_problem, reference_hessian, kind, dataset)
    exact = float(torch.trace(dense))
    for seed in SEEDS:
        est = hutchinson_trace(op, probes=20, seed=seed)
        assert abs(est.value - exact) <= 4 * est.uncertainty, (seed, est, exact)
    assert est.hvps == est.samples == 20 and len(passes) == len(SEEDS)  # one pass each


@pytest.mark.parametrize("kind, dataset", PROBLEMS)
def test_frobenius_within_4_stderr_of_the_exact_norm(
    make_problem, reference_hessian, kind: str, dataset: str
) -> None:
    op, dense, passes = setup(make_problem, reference_hessian, kind, dataset)
    exact = float(torch.linalg.matrix_norm(dense))
    for seed in SEEDS:
        est = frobenius(op, probes=60, seed=seed)
        assert abs(est.squared.value - exact**2) <= 4 * est.squared.uncertainty, (seed, est, exact)
        assert abs(est.value - exact) <= 4 * est.uncertainty, (seed, est, exact)
        assert est.value == pytest.approx(est.squared.value**0.5)
        assert est.uncertainty == pytest.approx(est.squared.uncertainty / (2 * est.value))
    assert est.hvps == 60 and len(passes) == DEPTH * len(SEEDS)


def test_standard_errors_shrink_as_probes_grow(make_problem, reference_hessian) -> None:
    op, _, _ = setup(make_problem, reference_hessian, "mlp_relu", "digits")
    for estimator, small, large in [
        (hutchinson_trace, 10, 160),
        (hutchpp_trace, 12, 192),
        (frobenius, 12, 192),
    ]:
        few = [estimator(op, probes=small, seed=s).uncertainty for s in SEEDS]
        many = [estimator(op, probes=large, seed=s).uncertainty for s in SEEDS]
        # 16x the probes: at least 4x smaller for Hutchinson's 1/sqrt(m); more with deflation
        assert sum(many) <= sum(few) / 3, (estimator.__name__, few, many)


def test_hutchpp_beats_hutchinson_at_equal_cost_on_a_hessian_with_outliers(
    make_problem, reference_hessian
) -> None:
    op, dense, _ = setup(make_problem, reference_hessian, "logreg", "digits")
    exact = float(torch.trace(dense))
    err_pp = [abs(hutchpp_trace(op, probes=60, seed=s).value - exact) for s in SEEDS]
    err_h = [abs(hutchinson_trace(op, probes=60, seed=s).value - exact) for s in SEEDS]
    assert sum(err_pp) < sum(err_h)


def test_hutchpp_is_exact_when_the_sketch_spans_the_range(dense_operator, spectrum_matrix) -> None:
    spectrum = torch.cat(
        [torch.tensor([5.0, 3.0, -2.0, 1.0], dtype=F64), torch.zeros(36, dtype=F64)]
    )
    op = dense_operator(spectrum_matrix(spectrum))
    est = hutchpp_trace(
        op, probes=40, seed=0
    )  # Krylov space of 3 blocks of 3 holds the rank-4 range
    assert est.value == pytest.approx(7.0, abs=1e-12) and est.uncertainty <= 1e-12
    fro = frobenius(op, probes=40, seed=0)
    assert fro.squared.value == pytest.approx(39.0, abs=1e-11) and fro.squared.uncertainty <= 1e-11


def test_adaptive_mode_adds_blocks_until_the_target(make_problem, reference_hessian) -> None:
    op, dense, passes = setup(make_problem, reference_hessian, "mlp_tanh", "digits")
    exact = float(torch.trace(dense))
    first = hutchpp_trace(op, probes=12, seed=3)
    assert first.relative_uncertainty > 0.05
    est = hutchpp_trace(op, probes=12, seed=3, target_rel_stderr=0.05, max_hvps=2000)
    assert est.relative_uncertainty <= 0.05 and est.hvps > 12 and est.samples > 10
    assert (
        est.hvps == 3 + est.samples
    )  # 3 Krylov blocks of 1 (the budget goes to samples) + remainder
    assert abs(est.value - exact) <= 4 * est.uncertainty
    capped = hutchinson_trace(op, probes=10, seed=3, target_rel_stderr=1e-9, max_hvps=35)
    assert capped.hvps == 35 and capped.samples == 35  # budget respected exactly
    fro = frobenius(op, probes=12, seed=3, target_rel_stderr=0.01, max_hvps=2000)
    assert fro.relative_uncertainty <= 0.01 and fro.hvps > 12


@pytest.mark.parametrize(
    "shrink, first_top_up",
    [
        (2.0, 99),  # 4x the samples for half the error, +10%: 30 * 3 * 1.1 more
        (1.0000001, 2),  # never fewer than 2
    ],
)
def test_adaptive_top_ups_take_the_count_the_spread_predicts(
    make_problem, reference_hessian, shrink: float, first_top_up: int
) -> None:
    op, _, passes = setup(make_problem, reference_hessian, "mlp_tanh", "digits")
    first = hutchinson_trace(op, probes=30, seed=3)
    target = first.relative_uncertainty / shrink
    passes.clear()
    start = op.hvps
    est = hutchinson_trace(op, probes=30, seed=3, target_rel_stderr=target, max_hvps=10_000)
    sizes = [b - a for a, b in zip([start, *passes[:-1]], passes, strict=True)]
    assert sizes[:2] == [30, first_top_up]  # the same first block, then the predicted count
    assert est.relative_uncertainty <= target and est.samples == est.hvps == sum(sizes)


def test_hutchpp_top_ups_take_a_pass_or_two_not_a_block_at_a_time(
    make_problem, reference_hessian
) -> None:
    op, _, passes = setup(make_problem, reference_hessian, "mlp_tanh", "digits")
    est = hutchpp_trace(op, probes=12, seed=3, target_rel_stderr=0.05, max_hvps=2000)
    assert est.relative_uncertainty <= 0.05
    assert (
        len(passes) <= DEPTH + 2
    )  # the Krylov passes, then one or two top-ups, not a block at a time


def test_probes_follow_the_operator_dtype(make_problem, reference_hessian) -> None:
    problem = make_problem("mlp_tanh", "digits")
    op32 = CurvatureOperator(problem.model, problem.inputs, problem.targets)  # float32
    exact = float(torch.trace(reference_hessian(problem)))
    est = hutchpp_trace(op32, probes=60, seed=0)
    assert abs(est.value - exact) <= 4 * est.uncertainty + 1e-4 * abs(exact)


@pytest.mark.parametrize(
    "call",
    [
        lambda op: hutchpp_trace(op, probes=3),
        lambda op: frobenius(op, probes=2),
        lambda op: hutchinson_trace(op, probes=1),
        lambda op: hutchinson_trace(op, target_rel_stderr=0.0),
        lambda op: hutchpp_trace(op, max_hvps=0),
    ],
)
def test_bad_arguments_raise_usage_errors(dense_operator, call) -> None:
    with pytest.raises(UsageError):
        call(dense_operator(torch.eye(4, dtype=F64)))


@pytest.mark.parametrize(
    "probes, block, depth, samples",
    [
        (99, 22, 3, 33),  # 22 * 3 + 33 = 99
        (60, 10, 3, 30),
        (40, 3, 3, 31),  # the rounding remainder goes to the samples
        (24, 1, 3, 21),  # too small a budget: blocks of 1, the rest to samples
        (4, 1, 2, 2),
    ],
)
def test_budget_split_keeps_a_third_and_at_least_30_remainder_samples_when_it_can(
    make_problem, reference_hessian, probes: int, block: int, depth: int, samples: int
) -> None:
    op, _, passes = setup(make_problem, reference_hessian, "logreg", "digits")  # P = 650
    tr, fro = trace_and_frobenius(op, probes=probes, seed=0)
    assert tr.samples == fro.samples == samples and tr.hvps == fro.hvps == probes
    # `depth` Krylov passes of `block` products each, the remainder riding on the last
    assert passes == [block * (j + 1) for j in range(depth - 1)] + [block * depth + samples]


@pytest.mark.parametrize("kind, dataset", PROBLEMS)
def test_trace_and_frobenius_share_their_products(
    make_problem, reference_hessian, kind: str, dataset: str
) -> None:
    op, dense, passes = setup(make_problem, reference_hessian, kind, dataset)
    tr, fro = trace_and_frobenius(op, probes=60, seed=4)
    assert tr.hvps == fro.hvps == 60 and len(passes) == DEPTH  # both for the price of one
    assert abs(tr.value - float(torch.trace(dense))) <= 4 * tr.uncertainty
    assert abs(fro.squared.value - float(dense.pow(2).sum())) <= 4 * fro.squared.uncertainty
    alone_tr, alone_fro = hutchpp_trace(op, probes=60, seed=4), frobenius(op, probes=60, seed=4)
    assert (alone_tr.value, alone_tr.uncertainty) == (
        tr.value,
        tr.uncertainty,
    )  # same seed, same draws
    assert (alone_fro.value, alone_fro.uncertainty) == (fro.value, fro.uncertainty)


def test_the_krylov_subspace_beats_a_one_pass_sketch_at_equal_cost(
    make_problem, reference_hessian
) -> None:
    """Against Hutch++ as published (Q = orth(H S), s = 15, then H Q: 30 products) with
    the same 30 remainder samples (60 products in all), written here from its definition,
    on the logistic regression whose Hessian has 9 outliers: the 30-dimensional Krylov
    space removes more of them, so the remainders' standard errors are smaller.
    """
    op, _, _ = setup(make_problem, reference_hessian, "logreg", "digits")

    def one_pass_hutchpp(seed: int) -> tuple[float, float]:
        gen = generator(op, seed)
        q, _ = torch.linalg.qr(op.matmat(gaussian(op, 15, gen)))
        g = rademacher(op, 30, gen)
        g = g - q @ (q.T @ g)
        g = g - q @ (q.T @ g)
        hg = op.matmat(g)
        return float((g * hg).sum(0).std() / 30**0.5), float(hg.pow(2).sum(0).std() / 30**0.5)

    one_pass = [one_pass_hutchpp(s) for s in SEEDS]
    krylov = [trace_and_frobenius(op, probes=60, seed=s) for s in SEEDS]
    assert sum(t.uncertainty for t, _ in krylov) < 0.9 * sum(se for se, _ in one_pass)
    assert sum(f.squared.uncertainty for _, f in krylov) < 0.5 * sum(se for _, se in one_pass)


def test_a_subspace_that_fills_the_space_gives_the_exact_values(
    dense_operator, spectrum_matrix
) -> None:
    spectrum = torch.linspace(-1.0, 4.0, 12, dtype=F64)
    op = dense_operator(spectrum_matrix(spectrum))
    tr, fro = trace_and_frobenius(
        op, probes=60, seed=0
    )  # blocks of 10 > P = 12: Q = I after 2 steps
    assert tr.value == pytest.approx(float(spectrum.sum()), abs=1e-12) and tr.uncertainty <= 1e-12
    assert fro.squared.value == pytest.approx(float(spectrum.pow(2).sum()), abs=1e-11)
