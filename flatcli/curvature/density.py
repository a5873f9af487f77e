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

The K probes run in lockstep on the Lanczos core of :mod:`flatcli.curvature.lanczos`
(:class:`~flatcli.curvature.lanczos.LockstepLanczos`): each Lanczos step is ONE
``op.matmat`` of the K current vectors (one data pass for all probes), with each probe's
full reorthogonalisation against its own basis. A probe whose Krylov space becomes
invariant (beta ~ 0, e.g. a low-rank H) stops there; its quadrature is then exact, and
the others continue. Memory: K * m * P basis entries. The broadening (grid and default
width) is the one rule of :func:`flatcli.curvature.linalg.density_grid`, shared with the
density of an exact spectrum (:func:`flatcli.curvature.linalg.exact_density`).
"""

from __future__ import annotations

import torch

from flatcli.curvature.lanczos import LockstepLanczos
from flatcli.curvature.linalg import broaden, density_grid, tridiagonal_eigh
from flatcli.curvature.probes import LinearOperatorLike, generator, rademacher
from flatcli.curvature.results import SpectralDensity
from flatcli.errors import UsageError


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

    core = LockstepLanczos(op, rademacher(op, probes, gen), steps)
    for j in range(steps):
        beta = core.advance()
        if j + 1 == steps:
            break
        invariant = core.invariant(beta)  # this probe's quadrature is exact: it stops
        core.accept(stop=invariant, restart=torch.zeros_like(invariant))
        if not core.running:
            break
    nodes_list, weights_list = [], []
    for p in range(probes):
        theta, s = tridiagonal_eigh(*core.tridiagonal(p))
        nodes_list.append(theta)
        weights_list.append(s[0].pow(2))  # Gauss quadrature weights s_{1,i}^2
    nodes, weights = torch.cat(nodes_list), torch.cat(weights_list)

    grid, width = density_grid(nodes, grid_size, sigma)
    return SpectralDensity(
        grid=grid,
        values=broaden(nodes, weights, grid, width) / probes,
        nodes=nodes,
        weights=weights,
        sigma=width,
        hvps=op.hvps - start,
        probes=probes,
        iterations=max(core.lengths),
    )
