"""The shared dense kernels against numpy/scipy references in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from flatcli.curvature.linalg import (
    broaden,
    density_grid,
    exact_density,
    mean_and_stderr,
    orthogonalise,
    orthogonalise_with_coefficients,
    tridiagonal_eigh,
)
from flatcli.errors import UsageError

F64 = torch.float64


def orthonormal_rows(m: int, p: int, seed: int) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, m)))
    return torch.from_numpy(q.T.copy())


def test_mean_and_stderr_matches_numpy() -> None:
    x = np.random.default_rng(0).standard_normal(40) * 3 + 1
    mean, se = mean_and_stderr(torch.from_numpy(x))
    assert mean == pytest.approx(x.mean(), rel=1e-14)
    assert se == pytest.approx(x.std(ddof=1) / math.sqrt(40), rel=1e-12)


def test_mean_and_stderr_floor_is_the_rounding_of_the_samples_dtype() -> None:
    constant = torch.full((10,), 2.0, dtype=torch.float32)
    _, se = mean_and_stderr(constant, exact_part=-6.0)
    assert se == pytest.approx(torch.finfo(torch.float32).eps * (2.0 + 6.0))


def test_orthogonalise_one_vector_against_a_shared_basis() -> None:
    basis = orthonormal_rows(5, 30, seed=1)
    w = torch.from_numpy(np.random.default_rng(2).standard_normal(30))
    out, coeffs = orthogonalise_with_coefficients(w, basis)
    b = basis.numpy()
    expected = w.numpy() - b.T @ (b @ w.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(coeffs.numpy(), b @ w.numpy(), rtol=1e-12, atol=1e-12)
    assert float((basis @ out).abs().max()) < 1e-14
    torch.testing.assert_close(orthogonalise(w, basis), out, rtol=0, atol=0)


def test_orthogonalise_a_batch_against_a_shared_basis() -> None:
    basis = orthonormal_rows(4, 25, seed=3)
    w = torch.from_numpy(np.random.default_rng(4).standard_normal((6, 25)))
    out = orthogonalise(w, basis)
    for row_in, row_out in zip(w, out, strict=True):
        torch.testing.assert_close(orthogonalise(row_in, basis), row_out, rtol=1e-13, atol=1e-13)
    assert float((out @ basis.T).abs().max()) < 1e-14


def test_orthogonalise_a_batch_against_per_row_bases() -> None:
    bases = torch.stack([orthonormal_rows(3, 20, seed=s) for s in range(4)])  # (4, 3, 20)
    w = torch.from_numpy(np.random.default_rng(5).standard_normal((4, 20)))
    out, coeffs = orthogonalise_with_coefficients(w, bases)
    assert out.shape == (4, 20) and coeffs.shape == (4, 3)
    for k in range(4):
        single, c = orthogonalise_with_coefficients(w[k], bases[k])
        torch.testing.assert_close(out[k], single, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(coeffs[k], c, rtol=1e-13, atol=1e-13)
        assert float((bases[k] @ out[k]).abs().max()) < 1e-14


def test_twice_is_enough_for_a_nearly_dependent_vector() -> None:
    # w almost in the span: one pass leaves a component ~ eps ||w|| / ||w'||, two do not
    basis = orthonormal_rows(3, 50, seed=6)
    tiny = torch.from_numpy(np.random.default_rng(7).standard_normal(50)) * 1e-10
    w = basis.sum(dim=0) * 1e3 + tiny
    out = orthogonalise(w, basis)
    assert float((basis @ out).abs().max()) <= 1e-14 * float(torch.linalg.vector_norm(out))


@pytest.mark.parametrize("m", [1, 2, 7])
def test_tridiagonal_eigh_matches_scipy(m: int) -> None:
    rng = np.random.default_rng(m)
    a, b = rng.standard_normal(m), rng.standard_normal(m - 1)
    theta, s = tridiagonal_eigh(torch.from_numpy(a), torch.from_numpy(b))
    ref = scipy.linalg.eigh_tridiagonal(a, b, eigvals_only=True)
    np.testing.assert_allclose(theta.numpy(), ref, rtol=1e-12, atol=1e-12)
    t = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    np.testing.assert_allclose(t @ s.numpy(), s.numpy() * theta.numpy(), atol=1e-12)
    assert theta.dtype == F64 and s.shape == (m, m)


def test_tridiagonal_eigh_batched_equals_one_by_one() -> None:
    rng = np.random.default_rng(11)
    a = torch.from_numpy(rng.standard_normal((3, 5))).float()  # promoted to float64
    b = torch.from_numpy(rng.standard_normal((3, 4))).float()
    theta, s = tridiagonal_eigh(a, b)
    assert theta.shape == (3, 5) and s.shape == (3, 5, 5) and theta.dtype == F64
    for k in range(3):
        ref = scipy.linalg.eigh_tridiagonal(a[k].double().numpy(), b[k].double().numpy())[0]
        np.testing.assert_allclose(theta[k].numpy(), ref, rtol=1e-12, atol=1e-12)


def test_broaden_is_a_weighted_sum_of_gaussians() -> None:
    nodes = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    grid = torch.linspace(-3, 4, 101, dtype=F64)
    values = broaden(nodes, weights, grid, 0.3)
    ref = sum(
        w * np.exp(-0.5 * ((grid.numpy() - x) / 0.3) ** 2) / (0.3 * math.sqrt(2 * math.pi))
        for x, w in zip(nodes.numpy(), weights.numpy(), strict=True)
    )
    np.testing.assert_allclose(values.numpy(), ref, rtol=1e-13, atol=1e-15)


def test_density_grid_default_rule() -> None:
    nodes = torch.tensor([0.0, 10.0], dtype=F64)
    grid, sigma = density_grid(nodes, 512)
    assert sigma == pytest.approx(0.1)  # 1% of the spread
    assert float(grid[0]) == pytest.approx(-0.5) and float(grid[-1]) == pytest.approx(10.5)
    _, coarse = density_grid(nodes, 64)  # 1% is not resolved by 64 points: widened
    assert coarse == pytest.approx(10.0 / 53)
    _, single = density_grid(torch.tensor([3.0, 3.0], dtype=F64), 64)
    assert single == pytest.approx(0.03)


@pytest.mark.parametrize("grid_size, sigma", [(8, None), (64, -1.0), (64, 1e-4)])
def test_density_grid_refuses_bad_settings(grid_size: int, sigma: float | None) -> None:
    with pytest.raises(UsageError):
        density_grid(torch.tensor([0.0, 1.0], dtype=F64), grid_size, sigma)


def test_exact_density_integrates_to_one_with_the_eigenvalues_as_mean() -> None:
    eig = torch.from_numpy(np.random.default_rng(8).gamma(0.5, 2.0, size=200))
    grid, values = exact_density(eig)
    assert grid.shape == values.shape == (512,)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-6)
    mean = float(torch.trapezoid(grid * values, grid))
    assert mean == pytest.approx(float(eig.mean()), abs=1e-6 * float(eig.abs().max()))
    # the same grid and width as an SLQ density with these nodes
    expected_grid, sigma = density_grid(eig, 512)
    torch.testing.assert_close(grid, expected_grid, rtol=0, atol=0)
    ref = broaden(eig, torch.full_like(eig, 1 / 200), grid, sigma)
    torch.testing.assert_close(values, ref, rtol=0, atol=0)
