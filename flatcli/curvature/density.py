"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

The spectral density phi(t) = (1/P) sum_j delta(t - lambda_j) is estimated as in
Ubaru, Chen, Saad (2017, "Fast estimation of tr(f(A)) via stochastic Lanczos
quadrature"), Ghorbani, Krishnan, Xiao (2019, "An investigation into neural net
optimization via Hessian eigenvalue density") and Papyan (2020):

* for a unit probe v = g / ||g|| (g Rademacher), v^T f(H) v = sum_j (v^T u_j)^2 f(lambda_j);
  its expectation is (1/P) Tr f(H) = integral of f against phi;
* m Lanczos steps from v give T_m = S diag(theta) S^T; the Gauss quadrature with nodes
  theta_i and weights tau_i = s_{1,i}^2 (summing to 1) reproduces v^T f(H) v exactly for
  polynomials f of degree <= 2m - 1;
* averaging over K probes and replacing each delta by a Gaussian of width sigma:

      phi_sigma(t) = (1/K) sum_k sum_i tau_ki N(t; theta_ki, sigma^2).

So ``sum(weights * nodes) / probes`` is the unbiased estimate (1/K) sum_k v_k^T H v_k of
Tr(H) / P.

The K probes run in lockstep: each Lanczos step is ONE ``op.matmat`` of the K current
vectors (one data pass for all probes), and each probe's full reorthogonalisation
against its own basis (classical Gram-Schmidt, twice) is batched with ``torch.bmm``.
A probe whose Krylov space becomes invariant (beta ~ 0, e.g. a low-rank H) stops there;
its quadrature is then exact, and the others continue. Memory: K * m * P basis entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flatcli.curvature.probes import LinearOperatorLike, generator, rademacher
from flatcli.curvature.results import SpectralDensity
from flatcli.errors import UsageError


def _block_orthogonalise(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Per-probe CGS2: w (K, P) against basis (K, j, P); returns w and coefficients (K, j)."""
    c1 = torch.bmm(basis, w.unsqueeze(2))  # (K, j, 1)
    w = w - torch.bmm(basis.transpose(1, 2), c1).squeeze(2)
    c2 = torch.bmm(basis, w.unsqueeze(2))
    w = w - torch.bmm(basis.transpose(1, 2), c2).squeeze(2)
    return w, (c1 + c2).squeeze(2)


def _lanczos_lockstep(
    op: LinearOperatorLike, starts: Tensor, steps: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Lanczos for K start vectors (P, K) in lockstep.

    Returns, per probe, the diagonal alpha (m_k,) and off-diagonal beta (m_k - 1,) of
    its tridiagonal matrix, float64 on the CPU.
    """
    n, k = starts.shape
    eps = torch.finfo(op.dtype).eps
    basis = torch.empty(k, steps, n, device=op.device, dtype=op.dtype)
    basis[:, 0] = (starts / torch.linalg.vector_norm(starts, dim=0)).T
    alphas = torch.zeros(k, steps, dtype=torch.float64)  # small tridiagonal data: CPU
    betas = torch.zeros(k, steps, dtype=torch.float64)
    lengths = [steps] * k
    active = torch.arange(k)  # probes still running (CPU indices)

    for j in range(steps):
        on_device = active.to(op.device)
        # slices (views) while every probe runs; index copies only after one stopped
        previous = basis[:, : j + 1] if active.numel() == k else basis[on_device, : j + 1]
        w = op.matmat(previous[:, j].T).T  # ONE data pass for all running probes
        w, coeffs = _block_orthogonalise(w, previous)
        beta = torch.linalg.vector_norm(w, dim=1)
        alphas[active, j] = coeffs[:, j].to("cpu", torch.float64)
        if j + 1 == steps:
            break
        beta_cpu = beta.to("cpu", torch.float64)
        scale = torch.cat([alphas[active, : j + 1], betas[active, :j]], dim=1).abs().amax(dim=1)
        invariant = beta_cpu <= 64 * eps * scale  # this probe's Krylov space is invariant
        for probe in active[invariant].tolist():
            lengths[probe] = j + 1
        keep = ~invariant
        betas[active[keep], j] = beta_cpu[keep]
        keep_dev = keep.to(op.device)
        basis[on_device[keep_dev], j + 1] = w[keep_dev] / beta[keep_dev].unsqueeze(1)
        active = active[keep]
        if active.numel() == 0:
            break

    return (
        [alphas[p, : lengths[p]] for p in range(k)],
        [betas[p, : lengths[p] - 1] for p in range(k)],
    )


def _gauss_quadrature(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes (eigenvalues of T) and weights (squared first eigenvector components)."""
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(t)
    return nodes, vecs[0].pow(2)


def slq_density(
    op: LinearOperatorLike,
    *,
    probes: int = 4,
    iterations: int = 64,
    seed: int = 0,
    grid_size: int = 512,
    sigma: float | None = None,
) -> SpectralDensity:
    """Smoothed spectral density of H by stochastic Lanczos quadrature.

    Args:
        op: the operator (``matmat``, ``num_params``, ``device``, ``dtype``).
        probes: K random unit start vectors (Rademacher / sqrt(P)), run as one block.
        iterations: Lanczos steps per probe (one data pass each); capped at P.
        seed: seeds the probes (drawn on the operator's device and dtype).
        grid_size: points of the evaluation grid.
        sigma: Gaussian broadening; default 1% of the spread of the nodes (more if
            ``grid_size`` is too small to resolve that). The grid
            spans [min node - 5 sigma, max node + 5 sigma], so the density integrates
            to 1 up to ~1e-6; its spacing must not exceed sigma.

    Example:
        >>> import torch
        >>> from flatcli.curvature import CurvatureOperator, slq_density
        >>> torch.manual_seed(0) and None
        >>> op = CurvatureOperator(torch.nn.Linear(5, 3), torch.randn(40, 5),
        ...                        torch.randint(0, 3, (40,)), dtype=torch.float64)
        >>> d = slq_density(op, probes=2, iterations=10)
        >>> round(float(torch.trapezoid(d.values, d.grid)), 6)
        1.0
    """
    if probes < 1 or iterations < 1 or grid_size < 16:
        raise UsageError(
            f"need probes >= 1, iterations >= 1 and grid_size >= 16 "
            f"(got {probes}, {iterations}, {grid_size})"
        )
    if sigma is not None and not sigma > 0:
        raise UsageError(f"sigma must be positive, got {sigma}")
    steps = min(iterations, op.num_params)
    gen = generator(op, seed)
    start = op.hvps

    alphas, betas = _lanczos_lockstep(op, rademacher(op, probes, gen), steps)
    quadratures = [_gauss_quadrature(a, b) for a, b in zip(alphas, betas, strict=True)]
    nodes = torch.cat([q[0] for q in quadratures])
    weights = torch.cat([q[1] for q in quadratures])

    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = hi - lo
        # 1% of the spread, widened if needed so that the grid resolves it
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
    z = (grid[:, None] - nodes[None, :]) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    values = kernel @ weights / probes
    return SpectralDensity(
        grid=grid,
        values=values,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        hvps=op.hvps - start,
        probes=probes,
        iterations=max(a.numel() for a in alphas),
    )
