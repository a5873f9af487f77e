"""Extreme eigenvalues by the Lanczos method with full reorthogonalisation.

Lanczos (1950) builds an orthonormal basis V_m = [v_1 ... v_m] of the Krylov space
span{v_1, H v_1, ..., H^{m-1} v_1} from a Gaussian start vector, in which H is the
tridiagonal matrix T_m (diagonal alpha_j, off-diagonal beta_j):

    H V_m = V_m T_m + beta_m v_{m+1} e_m^T.

The eigenpairs (theta_i, s_i) of T_m give Ritz pairs (theta_i, y_i = V_m s_i) whose
residual is ``||H y_i - theta_i y_i|| = |beta_m s_{m,i}|``; for symmetric H some eigenvalue
lies within that distance of theta_i (Parlett 1998, "The Symmetric Eigenvalue Problem",
Thm 4.5.1), so the residual is a rigorous error bar. The extreme Ritz values converge
first, which is why Granziol (2020) and the PyHessian/hessian-eigenthings tools use
Lanczos for lambda_max; this one stops when the wanted residuals fall below
``tol * |theta|`` rather than after a fixed number of steps.

Every new vector is orthogonalised against the whole basis twice (classical
Gram-Schmidt, "twice is enough": Giraud, Langou, Rozloznik 2005), which keeps V_m
orthonormal to working precision and prevents the spurious copies of converged
eigenvalues that plain Lanczos produces. If the Krylov space becomes invariant
(beta ~ 0, e.g. when H has low rank) its Ritz values are eigenvalues and the run
stops; if fewer than k Ritz values exist by then, it continues from a fresh random
vector orthogonal to the basis (the dropped coupling is added to the residual bounds).
Each step costs one Hessian-vector product (one data pass) and O(P m) memory.

Rounding of the operator. In float32 the products are those of H + E, E the rounding of
the operator itself (sums over samples and parameters), and the Ritz residual bounds the
distance to the spectrum of H + E, not of H; ||E y|| can exceed the eps |theta| floor
(see tests/curvature/test_foreign_models.py). So a run
on an operator below float64 ends with a float64 re-check of the wanted Ritz vectors
(``op.astype(torch.float64)``: the same loss, parameters and data in float64; one data
pass for all of them). For a unit vector y and any theta, some eigenvalue of the float64
matrix H64 lies within

    r64 = ||H64 y - theta y||

of theta (Parlett, Thm 4.5.1, again). With rho = y^T H64 y, H64 y - rho y is orthogonal
to y, so r64^2 = ||H64 y - rho y||^2 + (rho - theta)^2 <= (||H64 y - rho y|| + |rho - theta|)^2:
r64 covers both the residual of the float64 matrix and the shift of the Rayleigh
quotient that the float32 operator caused. The reported bound is
max(residual, r64 + eps64 |theta|) (|theta| the largest wanted one), a bound for the
float64 matrix, i.e. for the exact Hessian up to float64 rounding. An operator without ``astype`` gets an estimate
instead: the explicit residual ||H y - theta y|| plus the spread ||H(3y)/3 - H y|| of a
product computed twice at different scales (the exact products agree, the rounding does
not). Either costs one data pass at the end, never one per step.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import torch
from torch import Tensor

from flatcli.curvature.probes import LinearOperatorLike, gaussian, generator
from flatcli.curvature.results import EigenEstimate, LanczosResult
from flatcli.errors import UsageError

#: Called after every Lanczos step with (step, wanted Ritz values, their residual bounds).
Callback = Callable[[int, tuple[float, ...], tuple[float, ...]], None]


class Which(str, enum.Enum):
    """Which end of the spectrum a Lanczos run resolves."""

    LARGEST = "largest"
    SMALLEST = "smallest"
    BOTH = "both"


def _wanted(m: int, k: int, which: Which) -> list[int]:
    """Indices (into ascending Ritz values of T_m) of the wanted ones, ascending."""
    low = set(range(min(k, m))) if which in (Which.SMALLEST, Which.BOTH) else set()
    high = set(range(max(m - k, 0), m)) if which in (Which.LARGEST, Which.BOTH) else set()
    return sorted(low | high)


def _orthogonalise(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt against the columns of ``basis``, twice.

    Returns the orthogonalised vector and the total coefficients ``basis^T w``.
    """
    c1 = basis.T @ w
    w = w - basis @ c1
    c2 = basis.T @ w
    w = w - basis @ c2
    return w, c1 + c2


def lanczos(
    op: LinearOperatorLike,
    *,
    k: int = 1,
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    which: str = "largest",
    return_vectors: bool = False,
    callback: Callback | None = None,
    recheck: bool = True,
) -> LanczosResult:
    """The k largest and/or smallest eigenvalues of a symmetric operator.

    Args:
        op: the operator (``matvec``, ``num_params``, ``device``, ``dtype``).
        k: how many eigenvalues at each wanted end.
        tol: stop when every wanted Ritz residual is at most ``tol * |theta|`` (for
            theta near 0: ``tol * sqrt(eps) * max|theta|``, eps of ``op.dtype``).
        max_iter: most Lanczos steps (and HVPs); capped at P.
        seed: seeds the Gaussian start vector (drawn on the operator's device/dtype).
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        return_vectors: also return the Ritz vectors (P, n) on the operator's device.
        callback: called after every step with (step, wanted Ritz values, their
            residual bounds): the current estimate, e.g. for a progress display.
        recheck: below float64, widen the final bounds by the operator's own rounding
            (the float64 re-check of the module docstring; one more data pass).

    Returns:
        A :class:`LanczosResult` with the wanted Ritz values (ascending), their
        residual norms (error bounds; below float64 including the operator's rounding),
        iterations, HVPs (the re-check's included) and whether it converged.
        An eigenvalue of multiplicity > 1 is found once (a Krylov space from one start
        vector holds one copy of each eigenvector it reaches).

    Example:
        >>> import torch
        >>> from flatcli.curvature import CurvatureOperator, lanczos
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
        >>> op = CurvatureOperator(model, x, y, dtype=torch.float64)
        >>> result = lanczos(op, k=1)
        >>> result.converged, result.residuals[0] <= 1e-6 * result.eigenvalues[0]
        (True, True)
    """
    which_ = _parse_which(which)
    if k < 1 or max_iter < 1 or not tol > 0:
        raise UsageError(
            f"need k >= 1, max_iter >= 1 and tol > 0 (got k={k}, max_iter={max_iter}, tol={tol})"
        )
    n = op.num_params
    k = min(k, n)
    m_max = min(max_iter, n)
    eps = torch.finfo(op.dtype).eps
    gen = generator(op, seed)
    hvps_before = op.hvps

    basis = torch.empty(n, m_max, device=op.device, dtype=op.dtype)
    v = gaussian(op, 1, gen)[:, 0]
    basis[:, 0] = v / torch.linalg.vector_norm(v)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples v_j and v_{j+1} in T (0 after a restart)
    dropped: list[tuple[int, float]] = []  # (step, beta) of each restart
    converged = False

    while True:
        j = len(alphas)
        m = j + 1
        w, coeffs = _orthogonalise(op.matvec(basis[:, j]), basis[:, :m])
        alphas.append(float(coeffs[j]))
        beta = float(torch.linalg.vector_norm(w))

        theta, s = _ritz(alphas, betas)
        spectral_scale = float(theta.abs().max())
        wanted = _wanted(m, k, which_)
        # A residual below the operator's rounding level (eps ||H||) is not resolved by
        # products computed in op.dtype: never report less than that.
        residuals = _residuals(s, beta, dropped).clamp(min=eps * spectral_scale)
        floor = math.sqrt(eps) * spectral_scale
        small_enough = all(residuals[i] <= tol * max(abs(float(theta[i])), floor) for i in wanted)
        invariant = beta <= 64 * eps * max(spectral_scale, abs(alphas[-1]))
        if callback is not None:
            callback(
                m,
                tuple(float(theta[i]) for i in wanted),
                tuple(float(residuals[i]) for i in wanted),
            )
        if m >= k and (small_enough or invariant):
            converged = True
            break
        if m == n:  # the Krylov space is the whole space: T_m is similar to H
            converged = True
            break
        if m == m_max:
            break
        if invariant:  # fewer than k Ritz values so far: restart orthogonally
            dropped.append((j, beta))
            betas.append(0.0)
            w, _ = _orthogonalise(gaussian(op, 1, gen)[:, 0], basis[:, :m])
            basis[:, m] = w / torch.linalg.vector_norm(w)
        else:
            betas.append(beta)
            basis[:, m] = w / beta

    vectors = None
    bounds = [float(residuals[i]) for i in wanted]
    extra_hvps = 0
    if return_vectors or (recheck and op.dtype != torch.float64):
        s_wanted = s[:, wanted].to(device=op.device, dtype=op.dtype)
        vectors = basis[:, :m] @ s_wanted
        if recheck and op.dtype != torch.float64:
            thetas = theta[wanted].to(device=op.device, dtype=torch.float64)
            rounding, extra_hvps = _operator_rounding(op, vectors, thetas)
            bounds = [max(b, float(r)) for b, r in zip(bounds, rounding)]
        if not return_vectors:
            vectors = None
    return LanczosResult(
        eigenvalues=tuple(float(theta[i]) for i in wanted),
        residuals=tuple(bounds),
        iterations=m,
        hvps=op.hvps - hvps_before + extra_hvps,
        converged=converged,
        which=which_.value,
        vectors=vectors,
    )


def _operator_rounding(
    op: LinearOperatorLike, vectors: Tensor, thetas: Tensor
) -> tuple[Tensor, int]:
    """Bounds for the Ritz pairs (thetas, columns of ``vectors``) that include the
    operator's rounding (module docstring), float64; and the products they took.
    """
    astype = getattr(op, "astype", None)
    scale = float(thetas.abs().max())
    if callable(astype):
        op64 = astype(torch.float64)
        y = vectors.to(torch.float64)
        y = y / torch.linalg.vector_norm(y, dim=0)
        r64 = torch.linalg.vector_norm(op64.matmat(y) - y * thetas, dim=0)
        return r64 + torch.finfo(torch.float64).eps * scale, op64.hvps
    y = vectors / torch.linalg.vector_norm(vectors, dim=0)
    k = y.shape[1]
    hy = op.matmat(torch.cat([y, 3 * y], dim=1)).to(torch.float64)
    y = y.to(torch.float64)
    spread = torch.linalg.vector_norm(hy[:, k:] / 3 - hy[:, :k], dim=0)
    residual = torch.linalg.vector_norm(hy[:, :k] - y * thetas, dim=0)
    return residual + spread + torch.finfo(op.dtype).eps * scale, 0  # counted in op.hvps


def _parse_which(which: str) -> Which:
    try:
        return Which(which)
    except ValueError:
        raise UsageError(
            f"unknown spectrum end {which!r}", "choose 'largest', 'smallest' or 'both'"
        ) from None


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the tridiagonal T_m, in float64 on the CPU (ascending)."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def _residuals(s: Tensor, beta: float, dropped: list[tuple[int, float]]) -> Tensor:
    """Residual norms ``||H y_i - theta_i y_i||`` of all Ritz pairs.

    ``beta |s_{m,i}|``, plus ``beta_r |s_{j_r,i}|`` for each restart r at step j_r
    (the coupling set to zero there), which keeps the bound rigorous.
    """
    res = beta * s[-1, :].abs()
    for step, b in dropped:
        res = res + b * s[step, :].abs()
    return res


def lambda_max(
    op: LinearOperatorLike,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    callback: Callback | None = None,
) -> EigenEstimate:
    """The largest eigenvalue (the most positive, not the largest in modulus)."""
    r = lanczos(op, k=1, tol=tol, max_iter=max_iter, seed=seed, which="largest", callback=callback)
    return EigenEstimate(r.eigenvalues[-1], r.residuals[-1], r.hvps, r.converged)


def lambda_min(
    op: LinearOperatorLike,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    callback: Callback | None = None,
) -> EigenEstimate:
    """The smallest (most negative) eigenvalue."""
    r = lanczos(op, k=1, tol=tol, max_iter=max_iter, seed=seed, which="smallest", callback=callback)
    return EigenEstimate(r.eigenvalues[0], r.residuals[0], r.hvps, r.converged)


def extreme_eigenvalues(
    op: LinearOperatorLike,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    callback: Callback | None = None,
) -> tuple[EigenEstimate, EigenEstimate]:
    """``(lambda_min, lambda_max)`` from ONE Lanczos run (``which="both"``).

    Both estimates report the hvps of that shared run; do not add them up.
    """
    r = lanczos(op, k=1, tol=tol, max_iter=max_iter, seed=seed, which="both", callback=callback)
    low = EigenEstimate(r.eigenvalues[0], r.residuals[0], r.hvps, r.converged)
    high = EigenEstimate(r.eigenvalues[-1], r.residuals[-1], r.hvps, r.converged)
    return low, high
