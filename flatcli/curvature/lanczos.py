"""The Lanczos method: one lockstep core, and extreme eigenvalues with error bounds.

Lanczos (1950) builds an orthonormal basis V_m = [v_1 ... v_m] of the Krylov space
span{v_1, H v_1, ..., H^{m-1} v_1} from a start vector, in which H is the tridiagonal
matrix T_m (diagonal alpha_j, off-diagonal beta_j):

    H V_m = V_m T_m + beta_m v_{m+1} e_m^T.

The core, :class:`LockstepLanczos`, runs K such recurrences from K start vectors at
once: each step is ONE ``op.matmat`` of the K current vectors (one data pass for all),
and each new vector is orthogonalised against its own whole basis twice (classical
Gram-Schmidt, "twice is enough": Giraud, Langou, Rozloznik 2005;
:func:`flatcli.curvature.linalg.orthogonalise`), which keeps every V_m orthonormal to
working precision and prevents the spurious copies of converged eigenvalues that plain
Lanczos produces. A recurrence whose Krylov space becomes invariant (beta ~ 0, e.g. when
H has low rank) is stopped there or restarted from a random vector orthogonal to its
basis (the dropped coupling is added to the residual bounds); the others continue.
:func:`lanczos` (extreme eigenvalues) runs it with K = 1,
:func:`flatcli.curvature.density.slq_density` with K probes. Memory: K m P basis entries.

Error bounds. The eigenpairs (theta_i, s_i) of T_m give Ritz pairs (theta_i, y_i = V_m s_i)
whose residual is ``r_i = ||H y_i - theta_i y_i|| = |beta_m s_{m,i}|``; for symmetric H some
eigenvalue lies within r_i of theta_i (Parlett 1998, "The Symmetric Eigenvalue Problem",
Thm 4.5.1), so the residual is a rigorous error bar. It is pessimistic: the error of a
converged Ritz value falls like r_i^2, not r_i. The gap theorem (Kato 1949, Temple 1929;
Parlett 1998, sec. 10.2 and Thm 11.7.1) makes that precise: if theta is the Rayleigh
quotient of a unit y with residual r, and (a, b) contains theta and exactly one
eigenvalue lambda of H, then

    theta - r^2 / (b - theta) <= lambda <= theta + r^2 / (theta - a).

For the largest Ritz value theta_1 (b = infinity), with a = theta_2 + r_2 from the next
Ritz value and its residual, the error is at most r_1^2 / delta with the gap
delta = theta_1 - (theta_2 + r_2); the smallest end is the mirror image, and an interior
wanted value takes the smaller of the gaps to its two neighbours. The assumption is that
no eigenvalue other than lambda lies above theta_2 + r_2 (below theta_2 - r_2 at the
smallest end). Interlacing gives only theta_2 <= lambda_2, never the upper side, so the
assumption cannot be verified from the Krylov space: it fails whenever an eigenvalue
close to lambda_1 has not yet been resolved (two outliers a fraction of a percent
apart, a narrow cluster at the top); theta_1 is then a mixture of both, and r_1^2 / delta
understates the error by orders of magnitude (tests/curvature/test_lanczos.py shows
such a case). The residual bound has a milder form of the same limitation: it bounds the
distance to SOME eigenvalue, which in an unresolved pair need not be lambda_1.

With ``gap_rule=True`` :func:`lanczos` uses the gap bound, and stops on it, only where the
premises that can be checked hold: theta_1 has a neighbour, delta > r_1 (so the gap
bound is the smaller one and the two Ritz intervals are disjoint), the same held at the
previous step, and theta_1 stayed inside the interval that the previous step's gap bound
claimed (Ritz values move monotonically towards the extreme eigenvalues, so a Ritz
value beyond that interval proves the assumption false). Everywhere else, and by
default, the bound is the rigorous residual. :attr:`LanczosResult.bound_kinds` says which
was used, after the float64 re-check below: where that re-check's residual exceeds the
gap bound it is what is reported, labelled ``"residual"``. With a clear gap the gap rule
stops several products earlier.

Rounding of the operator. In float32 the products are those of H + E, E the rounding of
the operator itself (sums over samples and parameters), and the Ritz residual bounds the
distance to the spectrum of H + E, not of H; ||E y|| can exceed the eps |theta| floor
(see tests/curvature/test_foreign_models.py). So a run on an operator below float64 ends
with a float64 re-check of the wanted Ritz vectors (``op.astype(torch.float64)``: the same
loss, parameters and data in float64; one data pass for all of them). For a unit vector y
and any theta, some eigenvalue of the float64 matrix H64 lies within

    r64 = ||H64 y - theta y||

of theta (Parlett, Thm 4.5.1, again). With rho = y^T H64 y, H64 y - rho y is orthogonal
to y, so r64^2 = ||H64 y - rho y||^2 + (rho - theta)^2 <= (||H64 y - rho y|| + |rho - theta|)^2:
r64 covers both the residual of the float64 matrix and the shift of the Rayleigh
quotient that the float32 operator caused. The reported bound is
max(bound, r64 + eps64 |theta|) (|theta| the largest wanted one), a bound for the
float64 matrix, i.e. for the exact Hessian up to float64 rounding. An operator without
``astype`` gets an estimate instead: the explicit residual ||H y - theta y|| plus the
spread ||H(3y)/3 - H y|| of a product computed twice at different scales (the exact
products agree, the rounding does not). Either costs one data pass at the end, never one
per step.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TypedDict

import torch
from torch import Tensor
from typing_extensions import Unpack

from flatcli.curvature.linalg import (
    orthogonalise,
    orthogonalise_with_coefficients,
    tridiagonal_eigh,
)
from flatcli.curvature.probes import LinearOperatorLike, gaussian, generator
from flatcli.curvature.results import BoundKind, Estimate, LanczosResult
from flatcli.errors import UsageError

#: Called after every Lanczos step with (step, wanted Ritz values, their error bounds).
Callback = Callable[[int, tuple[float, ...], tuple[float, ...]], None]


class Which(str, enum.Enum):
    """Which end of the spectrum a Lanczos run resolves."""

    LARGEST = "largest"
    SMALLEST = "smallest"
    BOTH = "both"


class LockstepLanczos:
    """K Lanczos recurrences advanced together, one ``op.matmat`` per step.

    Sequence p keeps its basis (rows of ``basis[p]``), its tridiagonal matrix (``alphas``,
    ``betas``: float64 on the CPU) and the couplings dropped at its restarts. A step is
    :meth:`advance` (the product, full reorthogonalisation, alpha_j and the new beta_j of
    every running sequence) followed by :meth:`accept`, which stops, restarts or extends
    each of them.
    """

    def __init__(self, op: LinearOperatorLike, starts: Tensor, max_steps: int) -> None:
        """Start K recurrences from the columns of ``starts`` (P, K), for at most
        ``max_steps`` steps each.
        """
        n, k = starts.shape
        self.op = op
        self.max_steps = max_steps
        self.basis = torch.empty(k, max_steps, n, device=op.device, dtype=op.dtype)
        self.basis[:, 0] = (starts / torch.linalg.vector_norm(starts, dim=0)).T
        self.alphas = torch.zeros(k, max_steps, dtype=torch.float64)  # small data: CPU
        #: betas[p, j] couples v_j and v_{j+1} of sequence p (0 after a restart at j)
        self.betas = torch.zeros(k, max_steps, dtype=torch.float64)
        #: (step, beta) of each restart of each sequence
        self.dropped: list[list[tuple[int, float]]] = [[] for _ in range(k)]
        self.lengths = [0] * k
        self.active = torch.arange(k)  # sequences still running (CPU indices)
        self.steps = 0
        self._w: Tensor | None = None
        self._beta: Tensor | None = None

    @property
    def running(self) -> bool:
        """Whether any sequence is still running."""
        return self.active.numel() > 0

    def advance(self) -> Tensor:
        """One step of every running sequence; returns their new beta_j (float64, CPU)."""
        j = self.steps
        full = self.active.numel() == self.basis.shape[0]
        # slices (views) while every sequence runs; index copies only after one stopped
        previous = (
            self.basis[:, : j + 1] if full else self.basis[self.active.to(self.op.device), : j + 1]
        )
        w = self.op.matmat(previous[:, j].T).T  # ONE data pass for all running sequences
        w, coeffs = orthogonalise_with_coefficients(w, previous)
        beta: Tensor = torch.linalg.vector_norm(w, dim=1)
        self.alphas[self.active, j] = coeffs[:, j].to("cpu", torch.float64)
        self.steps = j + 1
        for p in self.active.tolist():
            self.lengths[p] = j + 1
        self._w, self._beta = w, beta
        return beta.to("cpu", torch.float64)

    def invariant(self, beta: Tensor) -> Tensor:
        """Which running sequences reached an invariant subspace: ``beta <= 64 eps ||T||``,
        ||T|| taken as the largest entry of the sequence's tridiagonal matrix.
        """
        j = self.steps
        entries = torch.cat([self.alphas[self.active, :j], self.betas[self.active, : j - 1]], 1)
        scale = entries.abs().amax(dim=1)
        return beta <= 64 * torch.finfo(self.op.dtype).eps * scale

    def accept(self, stop: Tensor, restart: Tensor, gen: torch.Generator | None = None) -> None:
        """Stop the running sequences marked ``stop``; restart those marked ``restart``
        from a random vector orthogonal to their basis (drawn from ``gen``); extend the
        others by v_{j+1} = w / beta_j. Masks are aligned with the running sequences.
        """
        if self._w is None or self._beta is None:
            raise RuntimeError("accept() needs a step: call advance() first")
        j = self.steps - 1
        w, beta = self._w, self._beta
        beta_cpu = beta.to("cpu", torch.float64)
        extend = ~stop & ~restart
        rows = self.active[extend]
        self.betas[rows, j] = beta_cpu[extend]
        ext = extend.to(w.device)
        self.basis[rows.to(w.device), j + 1] = w[ext] / beta[ext].unsqueeze(1)
        again = restart & ~stop
        if bool(again.any()):
            if gen is None:
                raise ValueError("a restart needs a generator")
            rows = self.active[again]
            for p, b in zip(rows.tolist(), beta_cpu[again].tolist(), strict=True):
                self.dropped[p].append((j, b))
            rows_dev = rows.to(w.device)
            fresh = gaussian(self.op, rows.numel(), gen).T
            fresh = orthogonalise(fresh, self.basis[rows_dev, : j + 1])
            self.basis[rows_dev, j + 1] = fresh / torch.linalg.vector_norm(fresh, dim=1)[:, None]
        self.active = self.active[~stop]
        self._w = self._beta = None

    def tridiagonal(self, p: int) -> tuple[Tensor, Tensor]:
        """Diagonal (m,) and off-diagonal (m - 1,) of sequence p's T_m, float64, CPU."""
        m = self.lengths[p]
        return self.alphas[p, :m], self.betas[p, : m - 1]

    def residuals(self, p: int, s: Tensor, beta: float) -> Tensor:
        """Residual norms ``||H y_i - theta_i y_i||`` of all Ritz pairs of sequence p.

        ``beta |s_{m,i}|`` (``beta`` the last step's), plus ``beta_r |s_{j_r,i}|`` for each
        restart r at step j_r (the coupling set to zero there), which keeps the bound
        rigorous.
        """
        res = beta * s[-1, :].abs()
        for step, b in self.dropped[p]:
            res = res + b * s[step, :].abs()
        return res

    def ritz_vectors(self, p: int, s: Tensor) -> Tensor:
        """``V_m S`` for the columns S of eigenvectors of sequence p's T_m: (P, n)."""
        m = self.lengths[p]
        return self.basis[p, :m].T @ s.to(device=self.op.device, dtype=self.op.dtype)


def _wanted(m: int, k: int, which: Which) -> list[int]:
    """Indices (into ascending Ritz values of T_m) of the wanted ones, ascending."""
    low = set(range(min(k, m))) if which in (Which.SMALLEST, Which.BOTH) else set()
    high = set(range(max(m - k, 0), m)) if which in (Which.LARGEST, Which.BOTH) else set()
    return sorted(low | high)


def _end_key(i: int, m: int) -> int:
    """Ritz value i of m by its place from its end: 0, 1, ... from the largest, -1, -2,
    ... from the smallest.
    """
    return m - 1 - i if i >= m / 2 else -1 - i


def _gap_bounds(theta: Tensor, residuals: Tensor, wanted: list[int]) -> dict[int, float]:
    """The Kato-Temple bounds ``r_i^2 / delta_i`` of the wanted Ritz values whose gap
    premise holds at this step (a neighbour exists, ``delta_i > r_i``), by index.
    """
    m = theta.numel()
    out: dict[int, float] = {}
    if m < 2:
        return out
    for i in wanted:
        t, r = float(theta[i]), float(residuals[i])
        below = t - float(theta[i - 1] + residuals[i - 1]) if i > 0 else math.inf
        above = float(theta[i + 1] - residuals[i + 1]) - t if i < m - 1 else math.inf
        gap = min(below, above)
        if gap > r:
            out[i] = r * r / gap
    return out


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
    gap_rule: bool = False,
) -> LanczosResult:
    """The k largest and/or smallest eigenvalues of a symmetric operator.

    Args:
        op: the operator (``matmat``, ``num_params``, ``device``, ``dtype``).
        k: how many eigenvalues at each wanted end.
        tol: stop when every wanted error bound is at most ``tol * |theta|`` (for
            theta near 0: ``tol * sqrt(eps) * max|theta|``, eps of ``op.dtype``).
        max_iter: most Lanczos steps (and HVPs); capped at P.
        seed: seeds the Gaussian start vector (drawn on the operator's device/dtype).
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        return_vectors: also return the Ritz vectors (P, n) on the operator's device.
        callback: called after every step with (step, wanted Ritz values, their error
            bounds): the current estimate, e.g. for a progress display.
        recheck: below float64, widen the final bounds by the operator's own rounding
            (the float64 re-check of the module docstring; one more data pass).
        gap_rule: use the gap (Kato-Temple) bound where its checkable premises hold, and
            stop on it; False (the default): the residual bound only (module docstring:
            the gap bound's assumption can fail unseen).

    Returns:
        A :class:`LanczosResult` with the wanted Ritz values (ascending), their residual
        norms and error bounds (below float64 including the operator's rounding), which
        bound each is, iterations, HVPs (the re-check's included) and whether it
        converged. An eigenvalue of multiplicity > 1 is found once (a Krylov space from
        one start vector holds one copy of each eigenvector it reaches).

    Example:
        >>> import torch
        >>> from flatcli.curvature import CurvatureOperator, lanczos
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
        >>> op = CurvatureOperator(model, x, y, dtype=torch.float64)
        >>> result = lanczos(op, k=1)
        >>> result.converged, result.bounds[0] <= 1e-6 * result.eigenvalues[0]
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

    core = LockstepLanczos(op, gaussian(op, 1, gen), m_max)
    # place from the end -> interval [theta - bound, theta + bound] the gap bound claimed
    claimed: dict[int, tuple[float, float]] = {}
    converged = False
    no = torch.zeros(1, dtype=torch.bool)

    while True:
        beta_t = core.advance()
        beta = float(beta_t[0])
        m = core.steps
        theta, s = tridiagonal_eigh(*core.tridiagonal(0))
        spectral_scale = float(theta.abs().max())
        wanted = _wanted(m, k, which_)
        # A residual below the operator's rounding level (eps ||H||) is not resolved by
        # products computed in op.dtype: never report less than that.
        residuals = core.residuals(0, s, beta).clamp(min=eps * spectral_scale)
        candidates = _gap_bounds(theta, residuals, wanted) if gap_rule else {}
        floor_bound = eps * spectral_scale
        # the gap bound counts only when its premise held at the previous step too and the
        # Ritz value stayed inside the interval claimed there
        gaps = {
            i: b
            for i, b in candidates.items()
            if claimed.get(_end_key(i, m), (math.inf, -math.inf))[0]
            <= float(theta[i])
            <= claimed.get(_end_key(i, m), (math.inf, -math.inf))[1]
        }
        bounds = {i: max(gaps.get(i, float(residuals[i])), floor_bound) for i in wanted}
        claimed = {
            _end_key(i, m): (
                float(theta[i]) - max(b, floor_bound),
                float(theta[i]) + max(b, floor_bound),
            )
            for i, b in candidates.items()
        }
        floor = math.sqrt(eps) * spectral_scale
        small_enough = all(bounds[i] <= tol * max(abs(float(theta[i])), floor) for i in wanted)
        invariant = bool(core.invariant(beta_t)[0])
        if callback is not None:
            callback(m, tuple(float(theta[i]) for i in wanted), tuple(bounds[i] for i in wanted))
        if m >= k and (small_enough or invariant):
            converged = True
            break
        if m == n:  # the Krylov space is the whole space: T_m is similar to H
            converged = True
            break
        if m == m_max:
            break
        # fewer than k Ritz values so far on an invariant subspace: restart orthogonally
        core.accept(no, torch.tensor([invariant]), gen)

    final_residuals = [float(residuals[i]) for i in wanted]
    final_bounds = [bounds[i] for i in wanted]
    kinds: tuple[BoundKind, ...] = tuple("gap" if i in gaps else "residual" for i in wanted)
    vectors = None
    extra_hvps = 0
    if return_vectors or (recheck and op.dtype != torch.float64):
        vectors = core.ritz_vectors(0, s[:, wanted])
        if recheck and op.dtype != torch.float64:
            thetas = theta[wanted].to(device=op.device, dtype=torch.float64)
            rounding, extra_hvps = _operator_rounding(op, vectors, thetas)
            final_residuals = [
                max(b, float(r)) for b, r in zip(final_residuals, rounding, strict=True)
            ]
            # a re-check residual above the Lanczos bound replaces it: label it so
            kinds = tuple(
                kind if b >= float(r) else "residual"
                for kind, b, r in zip(kinds, final_bounds, rounding, strict=True)
            )
            final_bounds = [max(b, float(r)) for b, r in zip(final_bounds, rounding, strict=True)]
        if not return_vectors:
            vectors = None
    return LanczosResult(
        eigenvalues=tuple(float(theta[i]) for i in wanted),
        residuals=tuple(final_residuals),
        bounds=tuple(final_bounds),
        bound_kinds=kinds,
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
        op64: LinearOperatorLike = astype(torch.float64)
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


def _estimate(r: LanczosResult, index: int) -> Estimate:
    """The wanted Ritz value ``index`` of a run as an :class:`Estimate` (kind ``"bound"``)."""
    return Estimate(
        value=r.eigenvalues[index],
        uncertainty=r.bounds[index],
        kind="bound",
        hvps=r.hvps,
        converged=r.converged,
    )


class ExtremeOptions(TypedDict, total=False):
    """The settings :func:`lambda_max`, :func:`lambda_min` and :func:`extreme_eigenvalues`
    pass on to :func:`lanczos` (its defaults apply to those left out).
    """

    tol: float
    max_iter: int
    seed: int
    callback: Callback | None
    gap_rule: bool


def lambda_max(op: LinearOperatorLike, **options: Unpack[ExtremeOptions]) -> Estimate:
    """The largest eigenvalue (the most positive, not the largest in modulus).

    Args:
        op: the operator.
        **options: ``tol``, ``max_iter``, ``seed``, ``callback``, ``gap_rule`` of
            :func:`lanczos`.

    Returns:
        An :class:`~flatcli.curvature.results.Estimate` of kind ``"bound"``: its
        ``uncertainty`` is the error bound of :func:`lanczos` (the residual, or the gap
        bound with ``gap_rule=True``), ``hvps`` the products of the run.
    """
    return _estimate(lanczos(op, k=1, which="largest", **options), -1)


def lambda_min(op: LinearOperatorLike, **options: Unpack[ExtremeOptions]) -> Estimate:
    """The smallest (most negative) eigenvalue, as for :func:`lambda_max`."""
    return _estimate(lanczos(op, k=1, which="smallest", **options), 0)


def extreme_eigenvalues(
    op: LinearOperatorLike, **options: Unpack[ExtremeOptions]
) -> tuple[Estimate, Estimate]:
    """``(lambda_min, lambda_max)`` from ONE Lanczos run (``which="both"``), with the
    options of :func:`lambda_max`.

    Both estimates report the hvps of that shared run; do not add them up.
    """
    r = lanczos(op, k=1, which="both", **options)
    return _estimate(r, 0), _estimate(r, -1)
