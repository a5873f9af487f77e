"""Stochastic Lanczos quadrature: a density that integrates to 1, whose mean estimates
Tr(H)/P within the stochastic tolerance, quadratures exact for low-degree moments of
each probe, and probes run in lockstep (one data pass per Lanczos step).
"""

from __future__ import annotations

import math

import pytest
import torch

from flatcli.curvature import CurvatureOperator, exact_density, slq_density
from flatcli.curvature.probes import generator, rademacher
from flatcli.errors import UsageError

F64 = torch.float64


def setup(make_problem, reference_hessian, kind: str, dataset: str):
    problem = make_problem(kind, dataset)
    passes: list[int] = []
    op = CurvatureOperator(
        problem.model, problem.inputs, problem.targets, dtype=F64, progress=passes.append
    )
    return op, reference_hessian(problem), passes


@pytest.mark.parametrize(
    "kind, dataset", [("mlp_relu", "digits"), ("bn_cnn", "digits"), ("cnn", "random")]
)
def test_density_integrates_to_one_and_its_mean_estimates_trace_over_p(
    make_problem, reference_hessian, kind: str, dataset: str
) -> None:
    op, dense, passes = setup(make_problem, reference_hessian, kind, dataset)
    probes, steps = 6, 20
    d = slq_density(op, probes=probes, iterations=steps, seed=0)
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-6)
    assert (d.values >= 0).all()
    # mean = (1/K) sum_k v_k^T H v_k with unit Rademacher v: variance per probe is
    # 2 (||H||_F^2 - sum_i H_ii^2) / P^2
    p = op.num_params
    stderr = (
        math.sqrt(2 * (float(dense.pow(2).sum()) - float(dense.diagonal().pow(2).sum())) / probes)
        / p
    )
    assert abs(d.mean - float(torch.trace(dense)) / p) <= 4 * stderr
    # the trapezoid mean of the smoothed density equals the quadrature mean
    assert float(torch.trapezoid(d.grid * d.values, d.grid)) == pytest.approx(
        d.mean, abs=1e-6 * float(d.grid.abs().max())
    )
    # lockstep: one data pass per Lanczos step for all probes together
    assert d.hvps == probes * steps and len(passes) == steps and d.iterations == steps


def test_each_probes_quadrature_reproduces_its_low_moments(make_problem, reference_hessian) -> None:
    # sum_i tau_ki theta_ki^j = v_k^T H^j v_k exactly for j <= 2 m - 1
    op, dense, _ = setup(make_problem, reference_hessian, "mlp_tanh", "digits")
    probes, steps = 3, 4
    d = slq_density(op, probes=probes, iterations=steps, seed=7)
    starts = rademacher(op, probes, generator(op, 7))
    starts = starts / torch.linalg.vector_norm(starts, dim=0)
    nodes, weights = d.nodes.reshape(probes, steps), d.weights.reshape(probes, steps)
    for j in range(2 * steps):
        expected = torch.einsum("pk,pq,qk->k", starts, torch.linalg.matrix_power(dense, j), starts)
        torch.testing.assert_close((weights * nodes**j).sum(dim=1), expected, rtol=1e-8, atol=1e-12)


def test_full_length_run_puts_nodes_on_the_eigenvalues(dense_operator, spectrum_matrix) -> None:
    spectrum = torch.tensor([-0.5, 0.0, 0.25, 1.0, 4.0, 9.0], dtype=F64)
    op = dense_operator(spectrum_matrix(spectrum))
    d = slq_density(op, probes=2, iterations=50, seed=0)  # capped at P = 6 steps
    assert d.iterations == 6 and d.hvps == 12
    for node in d.nodes:
        assert float((spectrum - node).abs().min()) <= 1e-9
    assert d.weights.reshape(2, 6).sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_exact_and_slq_densities_share_one_broadening_rule(dense_operator, spectrum_matrix) -> None:
    # a full-length run has the eigenvalues as nodes: the same grid and width as the
    # exact density, and the same values where each probe weighs every eigenvalue 1/P
    spectrum = torch.tensor([-0.5, 0.0, 0.25, 1.0, 4.0, 9.0], dtype=F64)
    d = slq_density(dense_operator(spectrum_matrix(spectrum)), probes=3, iterations=6, seed=1)
    grid, values = exact_density(spectrum)
    torch.testing.assert_close(d.grid, grid, rtol=0, atol=1e-9)
    assert d.sigma == pytest.approx(0.01 * 9.5, rel=1e-9)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-6)
    # the SLQ density is the exact one reweighted: same Gaussians, weights tau_ki / K
    tau = torch.zeros(6, dtype=F64)
    for node, weight in zip(d.nodes, d.weights, strict=True):
        tau[int((spectrum - node).abs().argmin())] += weight / 3
    kernel = torch.exp(-0.5 * ((grid[:, None] - spectrum[None, :]) / d.sigma) ** 2)
    kernel = kernel / (d.sigma * math.sqrt(2 * math.pi))
    torch.testing.assert_close(d.values, kernel @ tau, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(values, kernel @ torch.full((6,), 1 / 6, dtype=F64))


def test_probes_that_reach_an_invariant_subspace_stop_early(
    make_problem, reference_hessian
) -> None:
    # logistic regression with P = 18 and rank 12: Krylov spaces become invariant at ~13
    op, dense, passes = setup(make_problem, reference_hessian, "logreg", "random")
    d = slq_density(op, probes=3, iterations=18, seed=0)
    assert d.hvps < 3 * 18 and len(passes) < 18
    assert d.weights.sum().item() == pytest.approx(3.0, abs=1e-10)
    assert d.moment(2) == pytest.approx(float(dense.pow(2).sum()) / 18, rel=0.5)


def test_float32_operator_gives_a_float64_density(make_problem) -> None:
    problem = make_problem("cnn", "digits")
    op = CurvatureOperator(problem.model, problem.inputs, problem.targets)
    d = slq_density(op, probes=2, iterations=10)
    assert d.values.dtype == F64 and d.grid.shape == (512,)
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-6)


def test_explicit_sigma_and_grid(dense_operator, spectrum_matrix) -> None:
    op = dense_operator(spectrum_matrix(torch.linspace(0.0, 1.0, 30, dtype=F64)))
    d = slq_density(op, probes=2, iterations=8, sigma=0.05, grid_size=64)
    assert d.sigma == 0.05 and d.grid.numel() == 64
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(UsageError, match="grid_size"):
        slq_density(op, probes=2, iterations=8, sigma=1e-4, grid_size=64)


@pytest.mark.parametrize(
    "kwargs", [dict(probes=0), dict(iterations=0), dict(grid_size=4), dict(sigma=-1.0)]
)
def test_bad_arguments_raise_usage_errors(dense_operator, kwargs: dict) -> None:
    with pytest.raises(UsageError):
        slq_density(dense_operator(torch.eye(4, dtype=F64)), **kwargs)
