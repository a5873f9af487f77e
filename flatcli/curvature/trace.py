"""Trace and Frobenius norm of the Hessian, estimated from Hessian-vector products.

Hutchinson (1989): for probes g with E[g g^T] = I (Rademacher here),
E[g^T H g] = Tr H, so the mean of m samples is unbiased with standard error
std / sqrt(m), and variance 2 (||H||_F^2 - sum_i H_ii^2) / m.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021, "Hutch++: Optimal stochastic trace
estimation"): take the trace of H on a subspace Q exactly and run Hutchinson only on
the deflated remainder,

    Tr H = Tr(Q^T H Q) + Tr(Pi H Pi),   Pi = I - QQ^T,
         ~ Tr(Q^T H Q) + (1/n) sum_i g_i^T Pi H Pi g_i.

The first term is exact given Q and the n remainder samples are independent given Q
(Q never sees them), so the estimate is unbiased for ANY such Q and the samples'
standard deviation / sqrt(n) is an honest standard error. Hessians have a few large
outlier eigenvalues (Papyan 2020); the better Q captures them, the smaller the
remainder's variance 2 ||Pi H Pi||_F^2 / n.

The subspace: Hutch++ sketches Q = orth(H S) (s products) and then needs H Q (s more).
Here Q is a block Krylov space instead, built by block Lanczos-style steps: Q_1 =
orth(S) from b Gaussian vectors, then Q_{j+1} = orth((I - P_j) H Q_j) for DEPTH steps.
Every product H Q_j both extends the space and gives Tr(Q_j^T H Q_j), so b d products
buy a b d-dimensional subspace (not s for 2s), and a Krylov space catches the outliers
far better than one sketch (Musco & Musco 2015, "Randomized block Krylov methods";
Chen & Hallman 2023, "Krylov-aware stochastic trace estimation", who also exploit that
the Krylov basis comes with its Rayleigh quotients). The remainder probes are
projected against the final Q, which is known before the last step, so they ride on
the last data pass: DEPTH passes in all.

Frobenius norm, from the SAME products (*derived*: Pi idempotent, P_Q + Pi = I and
Tr(P_Q H^2 Pi) = 0):

    Tr H^2 = ||H Q||_F^2 + ||H Pi||_F^2 = sum_j ||H Q_j||_F^2 + E ||H Pi g||^2,

unbiased with a sample standard error; ||H||_F = sqrt(Tr H^2) gets its standard error
by the delta method, se(sqrt X) = se(X) / (2 sqrt X). :func:`trace_and_frobenius`
returns both at the price of one.

With ``target_rel_stderr`` the remainder gets fresh probes (one data pass per top-up, as
many as the spread so far predicts the target needs, plus 10%) until the relative
standard error meets the target or ``max_hvps`` is spent. The block Krylov subspace
against the one-sketch Hutch++ at equal cost is measured in bench/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypedDict

import torch
from torch import Tensor
from typing_extensions import Unpack

from flatcli.curvature.linalg import mean_and_stderr, orthogonalise
from flatcli.curvature.probes import LinearOperatorLike, gaussian, generator, rademacher
from flatcli.curvature.results import Estimate
from flatcli.errors import UsageError

#: The fewest independent samples behind a standard error that is reported as converged:
#: with a handful, the sample standard deviation is itself so noisy that errors of many
#: reported standard errors are common; from 10 on their rate is what Student's t with 9+
#: degrees of freedom predicts (measured in bench/README.md; checked against the dense
#: Hessian in tests/test_convergence.py). Fewer samples still give a value and a standard
#: error, marked ``converged=False``.
MIN_SAMPLES = 10


def _sampled(
    value: float, stderr: float, samples: int, hvps: int, target: float | None, exact: bool
) -> Estimate:
    """An estimate of kind ``"stderr"`` from ``samples`` samples, ``converged`` when the
    standard error is trustworthy: enough samples (or none needed, ``exact``) and the
    relative ``target`` met when one was asked for.
    """
    estimate = Estimate(value=value, uncertainty=stderr, kind="stderr", hvps=hvps, samples=samples)
    trusted = (exact or samples >= MIN_SAMPLES) and (
        target is None or estimate.relative_uncertainty <= target
    )
    return replace(estimate, converged=trusted)


@dataclass(frozen=True)
class _Budget:
    """The products an estimator may spend (``max_hvps``, default ``10 * probes``),
    counted on the operator from the estimator's start.
    """

    op: LinearOperatorLike
    start: int
    total: int

    @classmethod
    def of(
        cls, op: LinearOperatorLike, probes: int, target: float | None, max_hvps: int | None
    ) -> _Budget:
        """Check the adaptive settings and start counting."""
        if target is not None and not target > 0:
            raise UsageError(f"target_rel_stderr must be positive, got {target}")
        if max_hvps is not None and max_hvps < 1:
            raise UsageError(f"max_hvps must be positive, got {max_hvps}")
        return cls(op, op.hvps, max_hvps if max_hvps is not None else 10 * probes)

    @property
    def spent(self) -> int:
        """Products spent since the start."""
        return self.op.hvps - self.start

    def left(self) -> int:
        """Products still allowed."""
        return self.total - self.spent


def _top_up(samples: int, rel_stderr: float, target: float) -> int:
    """How many more samples should bring ``rel_stderr`` to ``target``: the standard error
    falls like 1/sqrt(n), so n (rel/target)^2 in all, with 10% to spare (at least 2).
    """
    return max(2, math.ceil(1.1 * samples * ((rel_stderr / target) ** 2 - 1)))


def _grow(
    samples: Tensor,
    new_samples: Callable[[int], Tensor],
    rel_stderr: Callable[[Tensor], float],
    target: float | None,
    budget_left: Callable[[], int],
) -> Tensor:
    """Append fresh samples (rows; one data pass per top-up) while the relative stderr
    misses ``target``; each top-up is the count that the current spread predicts to
    suffice.
    """
    if target is None:
        return samples
    while (rel := rel_stderr(samples)) > target:
        n = min(_top_up(samples.shape[0], rel, target), budget_left())
        if n < 1:
            break
        samples = torch.cat([samples, new_samples(n)])
    return samples


def hutchinson_trace(
    op: LinearOperatorLike,
    *,
    probes: int = 100,
    seed: int = 0,
    target_rel_stderr: float | None = None,
    max_hvps: int | None = None,
) -> Estimate:
    """Tr H by Hutchinson's estimator with Rademacher probes (one data pass per block).

    Args:
        op: the operator.
        probes: probes in the first block (at least 2, for a standard error).
        seed: seeds the probes (drawn on the operator's device and dtype).
        target_rel_stderr: if set, add probes (one data pass per top-up, as many as the
            spread so far predicts) until ``stderr / |value| <= target_rel_stderr`` or
            ``max_hvps`` is spent.
        max_hvps: the budget for the adaptive mode (default ``10 * probes``).

    Returns:
        An ``Estimate`` of kind ``"stderr"``, with the number of ``samples`` (= products).
    """
    if probes < 2:
        raise UsageError(f"need at least 2 probes for a standard error, got {probes}")
    budget = _Budget.of(op, probes, target_rel_stderr, max_hvps)
    gen = generator(op, seed)

    def new_samples(n: int) -> Tensor:
        g = rademacher(op, n, gen)
        return (g * op.matmat(g)).sum(dim=0)

    def estimate(samples: Tensor) -> Estimate:
        value, stderr = mean_and_stderr(samples)
        return _sampled(value, stderr, samples.numel(), budget.spent, target_rel_stderr, False)

    samples = _grow(
        new_samples(probes),
        new_samples,
        lambda s: estimate(s).relative_uncertainty,
        target_rel_stderr,
        budget.left,
    )
    return estimate(samples)


def _deflate(g: Tensor, q: Tensor) -> Tensor:
    """(I - QQ^T) g for columns g (P, n) and orthonormal columns q (P, k), applied twice
    for orthogonality to working precision (:func:`flatcli.curvature.linalg.orthogonalise`
    stores vectors by rows, hence the transposes).
    """
    return orthogonalise(g.T, q.T).T


def _split_budget(probes: int) -> tuple[int, int, int]:
    """(block b, depth d, remainder samples n) for a budget of ``probes`` = b d + n HVPs."""
    if probes < 4:
        raise UsageError(
            f"Hutch++ needs a budget of at least 4 products (got {probes})",
            "part builds the deflation subspace, the rest estimates the remainder",
        )
    # A third of the budget to the remainder, but at least MIN_REMAINDER samples when the
    # budget allows (a subspace of at least 1 vector is kept): with a handful, an
    # outlying eigenvalue left in the remainder makes the sample standard deviation, hence
    # the reported standard error, run low (measured in bench/README.md).
    n = max(probes // 3, 2, min(MIN_REMAINDER, probes - 3))
    sketch = probes - n
    depth = min(DEPTH, sketch)
    block = sketch // depth
    return block, depth, probes - block * depth


#: The fewest remainder samples taken when the budget allows (see _split_budget).
MIN_REMAINDER = 30
#: Data passes (block Krylov steps) that build the deflation subspace.
DEPTH = 3


@dataclass(frozen=True)
class _Deflated:
    """Per-probe samples of the two remainders, given the subspace Q (see module doc)."""

    trace_part: float  # Tr(Q^T H Q)
    squared_part: float  # ||H Q||_F^2
    trace_samples: Tensor  # g^T Pi H Pi g, g = Rademacher
    squared_samples: Tensor  # ||H Pi g||^2
    subspace: int  # dim Q


def _fresh_columns(
    op: LinearOperatorLike, x: Tensor, basis: Tensor, gen: torch.Generator
) -> Tensor:
    """Orthonormal columns spanning ``x`` deflated against ``basis`` (orthonormal).

    A column numerically inside span(basis) (the Krylov space became invariant, e.g.
    for a low-rank H) is replaced by a fresh Gaussian vector: any orthonormal Q keeps
    the estimator unbiased, since Q is independent of the remainder probes.
    """
    x, _ = torch.linalg.qr(_deflate(x, basis))
    x = _deflate(x, basis)  # QR of near-dependent columns can bring span(basis) back
    lost = torch.linalg.vector_norm(x, dim=0) < 0.5
    if bool(lost.any()):
        x[:, lost] = _deflate(gaussian(op, int(lost.sum()), gen), basis)
    x, _ = torch.linalg.qr(x)  # every column is deflated already
    return x


def _deflated_samples(
    op: LinearOperatorLike, probes: int, gen: torch.Generator
) -> tuple[_Deflated, Callable[[int], tuple[Tensor, Tensor]]]:
    """Build Q by block Krylov steps and take the first block of remainder samples.

    Returns the samples and a function drawing ``k`` more (one data pass each).
    """
    block, depth, n = _split_budget(probes)
    p = op.num_params
    x, _ = torch.linalg.qr(gaussian(op, min(block, p), gen))
    basis = x[:, :0]
    trace_part = squared_part = 0.0
    for step in range(depth):
        basis = torch.cat([basis, x], dim=1)
        last = step == depth - 1 or basis.shape[1] >= p
        g = _deflate(rademacher(op, n, gen), basis) if last else x[:, :0]
        hxg = op.matmat(torch.cat([x, g], dim=1))  # the remainder rides on the last pass
        hx, hg = hxg[:, : x.shape[1]], hxg[:, x.shape[1] :]
        trace_part += float((x * hx).sum(dtype=torch.float64))
        squared_part += float(hx.pow(2).sum(dtype=torch.float64))
        if last:
            break
        x = _fresh_columns(op, hx, basis, gen)[:, : p - basis.shape[1]]

    def samples_of(gk: Tensor, hgk: Tensor) -> tuple[Tensor, Tensor]:
        return (gk * hgk).sum(dim=0), hgk.pow(2).sum(dim=0)

    def more(k: int) -> tuple[Tensor, Tensor]:
        gk = _deflate(rademacher(op, k, gen), basis)
        return samples_of(gk, op.matmat(gk))

    tr, sq = samples_of(g, hg)
    return _Deflated(trace_part, squared_part, tr, sq, basis.shape[1]), more


def trace_and_frobenius(
    op: LinearOperatorLike,
    *,
    probes: int = 99,
    seed: int = 0,
    target_rel_stderr: float | None = None,
    max_hvps: int | None = None,
    targets: tuple[str, ...] = ("trace", "frobenius"),
) -> tuple[Estimate, Estimate]:
    """Tr H and ||H||_F, each with a standard error, from the same products.

    Block Krylov Hutch++: Q spans the Krylov space of ``DEPTH`` block steps from b
    Gaussian vectors; the remainder gets n Rademacher probes on the last pass (the
    budget split is ``_split_budget``: b d + n = ``probes``). Both estimates use the same
    Q and the same remainder probes, so asking for both costs no more than one.

    Args:
        probes: the budget of Hessian-vector products, at least 4.
        seed: seeds all random vectors (drawn on the operator's device and dtype).
        target_rel_stderr: if set, add remainder probes (one data pass per top-up, as
            many as the spread so far predicts) until the relative standard error of each
            estimate named in ``targets`` meets it, or ``max_hvps`` is spent.
        max_hvps: the budget for the adaptive mode (default ``10 * probes``).
        targets: which estimates the adaptive target applies to.

    Returns:
        ``(trace, norm)``, ``Estimate`` s of kind ``"stderr"`` with the number of remainder
        ``samples``; ``norm.squared`` is the estimate of Tr H^2. Each is
        ``converged=False`` when its standard error rests on fewer than
        :data:`MIN_SAMPLES` remainder samples (a budget under 13 products; the error can
        then be many standard errors) or misses the target it was given.

    Example:
        >>> import torch
        >>> from flatcli.curvature import CurvatureOperator, trace_and_frobenius
        >>> torch.manual_seed(0) and None
        >>> op = CurvatureOperator(torch.nn.Linear(5, 3), torch.randn(40, 5),
        ...                        torch.randint(0, 3, (40,)), dtype=torch.float64)
        >>> tr, fro = trace_and_frobenius(op, probes=30)
        >>> h = op.matmat(torch.eye(18, dtype=torch.float64))
        >>> abs(tr.value - float(torch.trace(h))) <= 4 * tr.uncertainty, tr.hvps == fro.hvps == 30
        (True, True)
    """
    budget = _Budget.of(op, probes, target_rel_stderr, max_hvps)
    gen = generator(op, seed)
    d, more = _deflated_samples(op, probes, gen)
    # Q spanning the whole space leaves no remainder: the values are exact.
    exact = d.subspace >= op.num_params

    def goal(name: str) -> float | None:
        return target_rel_stderr if name in targets else None

    def estimates(samples: Tensor) -> tuple[Estimate, Estimate]:
        """From the (n, 2) remainder samples: column 0 for Tr H, column 1 for Tr H^2."""
        mean, se = mean_and_stderr(samples[:, 0], d.trace_part)
        mean2, se2 = mean_and_stderr(samples[:, 1], d.squared_part)
        n, hvps = samples.shape[0], budget.spent
        trace = _sampled(d.trace_part + mean, se, n, hvps, goal("trace"), exact)
        squared = d.squared_part + mean2
        norm_value = math.sqrt(max(squared, 0.0))
        norm_se = se2 / (2 * norm_value) if norm_value > 0 else math.inf
        norm = _sampled(norm_value, norm_se, n, hvps, goal("frobenius"), exact)
        # Tr H^2 is trusted exactly when ||H||_F is
        return trace, replace(norm, squared=replace(norm, value=squared, uncertainty=se2))

    def rel(samples: Tensor) -> float:
        return max(
            e.relative_uncertainty
            for e, name in zip(estimates(samples), ("trace", "frobenius"), strict=True)
            if name in targets
        )

    samples = _grow(
        torch.stack([d.trace_samples, d.squared_samples], dim=1),
        lambda k: torch.stack(more(k), dim=1),
        rel,
        target_rel_stderr,
        budget.left,
    )
    return estimates(samples)


class TraceOptions(TypedDict, total=False):
    """The settings :func:`hutchpp_trace` and :func:`frobenius` pass on to
    :func:`trace_and_frobenius` (its defaults apply to those left out).
    """

    probes: int
    seed: int
    target_rel_stderr: float | None
    max_hvps: int | None


def hutchpp_trace(op: LinearOperatorLike, **options: Unpack[TraceOptions]) -> Estimate:
    """Tr H by block Krylov Hutch++ with a standard error: the first estimate of
    :func:`trace_and_frobenius` (the same draws; see its example).

    Args:
        op: the operator.
        **options: ``probes`` (the budget of products, at least 4), ``seed``,
            ``target_rel_stderr`` (if set, add remainder probes until
            ``stderr / |value| <= target_rel_stderr`` or ``max_hvps`` is spent) and
            ``max_hvps``, as for :func:`trace_and_frobenius`.
    """
    return trace_and_frobenius(op, targets=("trace",), **options)[0]


def frobenius(op: LinearOperatorLike, **options: Unpack[TraceOptions]) -> Estimate:
    """||H||_F = sqrt(Tr H^2) with a standard error (:func:`trace_and_frobenius`).

    ``Tr H^2 = ||H Q||_F^2 + mean_i ||H (I - QQ^T) g_i||^2``: the first term exact, the
    second unbiased with a sample standard error (``squared`` of the result). Options
    as for :func:`hutchpp_trace`; the adaptive target applies to ``||H||_F``.
    """
    return trace_and_frobenius(op, targets=("frobenius",), **options)[1]
