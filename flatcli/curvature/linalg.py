"""The small dense kernels the estimators share.

* :func:`orthogonalise`: classical Gram-Schmidt applied twice ("twice is enough":
  Giraud, Langou, Rozloznik 2005), one vector or a batch, against a shared basis or
  against one basis per row.
* :func:`tridiagonal_eigh`: eigen-decomposition of symmetric tridiagonal matrices (the
  Lanczos matrices T_m), float64 on the CPU, one or a batch.
* :func:`density_grid`, :func:`broaden`, :func:`exact_density`: the ONE Gaussian
  broadening rule of spectral densities, so that an exact spectrum and a stochastic Lanczos
  quadrature (SLQ) estimate are drawn on comparable grids with comparable widths.
* :func:`mean_and_stderr`: sample mean and standard error of independent samples.

Bases are stored by rows: a basis of m vectors of length P is an (m, P) tensor, and a
batch of K such bases is (K, m, P).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flatcli.errors import UsageError

__all__ = [
    "broaden",
    "density_grid",
    "exact_density",
    "mean_and_stderr",
    "orthogonalise",
    "orthogonalise_with_coefficients",
    "tridiagonal_eigh",
]


def mean_and_stderr(samples: Tensor, exact_part: float = 0.0) -> tuple[float, float]:
    """Mean and standard error of independent samples, in float64.

    The standard error is the sample standard deviation (with n - 1) over sqrt(n), but at
    least the rounding of the arithmetic, ``eps * (mean |sample| + |exact_part|)``, with
    eps of the samples' dtype (the operator's) and ``exact_part`` the deterministic term
    the mean is added to. Samples of zero variance (Hutch++ when its subspace spans the
    whole space, a trace with no random part) would otherwise report a standard error of
    ~1e-60, far below the error the products' rounding leaves in the value.

    Args:
        samples: the independent samples, 1-D, any floating dtype.
        exact_part: the deterministic part the mean is added to (only sets the floor).

    Returns:
        ``(mean, standard error)`` as Python floats.
    """
    x = samples.to(torch.float64)
    floor = torch.finfo(samples.dtype).eps * (float(x.abs().mean()) + abs(exact_part))
    return float(x.mean()), max(float(x.std(correction=1) / math.sqrt(x.numel())), floor)


def orthogonalise_with_coefficients(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt, twice: ``w - B^T c`` with ``c = c_1 + c_2`` the coefficients.

    With B the rows of ``basis`` (orthonormal), one pass computes ``c_1 = B w`` and
    ``w' = w - B^T c_1``; in floating point w' keeps a component along B of order
    eps ||w|| / ||w'||, which a second pass removes (Giraud, Langou, Rozloznik 2005:
    "twice is enough" when w is not numerically in the span of B).

    Shapes:

    * ``basis`` (m, P), a shared basis: ``w`` is one vector (P,) or a batch (n, P); the
      coefficients are (m,) or (n, m).
    * ``basis`` (K, m, P), one basis per row: ``w`` is (K, P); the coefficients (K, m).

    Returns:
        The orthogonalised ``w`` and the total coefficients ``B w`` (for Lanczos, the
        last one is the diagonal entry alpha_j of T).
    """
    if basis.dim() == 2:
        c1 = w @ basis.T
        w = w - c1 @ basis
        c2 = w @ basis.T
        return w - c2 @ basis, c1 + c2
    if basis.dim() != 3 or w.dim() != 2:
        raise ValueError(f"orthogonalise: basis {tuple(basis.shape)}, w {tuple(w.shape)}")
    c1 = torch.bmm(basis, w.unsqueeze(2))  # (K, m, 1)
    w = w - torch.bmm(basis.transpose(1, 2), c1).squeeze(2)
    c2 = torch.bmm(basis, w.unsqueeze(2))
    w = w - torch.bmm(basis.transpose(1, 2), c2).squeeze(2)
    return w, (c1 + c2).squeeze(2)


def orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """``(I - B^T B) w``, applied twice (see :func:`orthogonalise_with_coefficients`).

    ``basis`` (m, P) with ``w`` (P,) or (n, P), or ``basis`` (K, m, P) with ``w`` (K, P).
    """
    return orthogonalise_with_coefficients(w, basis)[0]


def tridiagonal_eigh(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of symmetric tridiagonal matrices.

    T has diagonal ``alphas`` and sub/super-diagonal ``betas``; for the Lanczos matrix
    T_m = S diag(theta) S^T the columns of S give the Ritz vectors (V_m s_i), their last
    entries the residuals (beta_m |s_{m,i}|) and their first entries the Gauss quadrature
    weights (s_{1,i}^2) of stochastic Lanczos quadrature.

    Args:
        alphas: (m,) or a batch (K, m).
        betas: (m - 1,) or (K, m - 1).

    Returns:
        ``(theta, S)``: (m,) and (m, m), or (K, m) and (K, m, m); float64 on the CPU.
    """
    a = alphas.to("cpu", torch.float64)
    b = betas.to("cpu", torch.float64)
    t = torch.diag_embed(a)
    if b.shape[-1] > 0:
        t = t + torch.diag_embed(b, offset=1) + torch.diag_embed(b, offset=-1)
    theta, s = torch.linalg.eigh(t)
    return theta, s


def density_grid(nodes: Tensor, grid_size: int, sigma: float | None = None) -> tuple[Tensor, float]:
    """The evaluation grid and Gaussian width for a density with these nodes.

    The default width is 1% of the spread of the nodes, widened when ``grid_size`` is too
    small to resolve it (``spread / (grid_size - 11)``), or 1% of ``max(|node|, 1)`` when
    all nodes coincide. The grid spans [min node - 5 sigma, max node + 5 sigma], so a sum
    of unit-mass Gaussians integrates to 1 over it up to ~1e-6 (trapezoid rule); its
    spacing must not exceed sigma.

    Raises:
        UsageError: ``grid_size`` is below 16, ``sigma`` is not positive, or ``sigma``
            is too small for ``grid_size`` points.

    Returns:
        ``(grid, sigma)``: the grid (grid_size,), float64 on the CPU, and the width used.
    """
    if grid_size < 16:
        raise UsageError(f"need grid_size >= 16 (got {grid_size})")
    if sigma is not None and not sigma > 0:
        raise UsageError(f"sigma must be positive, got {sigma}")
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = hi - lo
        sigma = (
            max(0.01 * spread, spread / (grid_size - 11))
            if spread > 0
            else 0.01 * max(abs(hi), 1.0)
        )
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    spacing = float(grid[1] - grid[0])
    if spacing > sigma:
        needed = math.ceil((hi - lo + 10 * sigma) / sigma) + 1
        raise UsageError(
            f"the grid is too coarse for sigma={sigma:.3g} (spacing {spacing:.3g})",
            f"use grid_size >= {needed} or a larger sigma",
        )
    return grid, float(sigma)


def broaden(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """The weighted sum of Gaussians ``sum_i w_i N(t; node_i, sigma^2)`` at ``grid``.

    A spectrum phi(t) = sum_i w_i delta(t - node_i) made smooth: for an exact spectrum
    the nodes are the P eigenvalues with weights 1/P; for SLQ the Gauss quadrature nodes
    and weights of K probes, divided by K. Float64 on the CPU, shape of ``grid``.
    """
    x = nodes.to("cpu", torch.float64)
    w = weights.to("cpu", torch.float64)
    z = (grid[:, None] - x[None, :]) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ w


def exact_density(
    eigenvalues: Tensor, grid_size: int = 512, sigma: float | None = None
) -> tuple[Tensor, Tensor]:
    """The density of an exact spectrum, broadened by the same rule as SLQ.

    phi_sigma(t) = (1/P) sum_j N(t; lambda_j, sigma^2), on the grid of
    :func:`density_grid`, so that it is comparable with
    :func:`flatcli.curvature.density.slq_density` of the same operator.

    Returns:
        ``(grid, values)``, float64 on the CPU; the values integrate to 1 over the grid.
    """
    eig = eigenvalues.to("cpu", torch.float64)
    grid, width = density_grid(eig, grid_size, sigma)
    weights = torch.full_like(eig, 1.0 / eig.numel())
    return grid, broaden(eig, weights, grid, width)
