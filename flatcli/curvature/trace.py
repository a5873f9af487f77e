"""Trace and Frobenius norm of the Hessian, estimated from Hessian-vector products.

Hutchinson (1989): for probes g with E[g g^T] = I (Rademacher here),
E[g^T H g] = Tr H, so the mean of m samples is unbiased with standard error
std / sqrt(m), and variance 2 (||H||_F^2 - sum_i H_ii^2) / m.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021, "Hutch++: Optimal stochastic trace
estimation"): with a budget of m products, sketch Q = orth(H S) from s = m/3 Gaussian
vectors, take the trace of the low-rank part exactly and run Hutchinson only on the
deflated remainder:

    Tr H = Tr(Q^T H Q) + Tr((I - QQ^T) H (I - QQ^T))
         ~ Tr(Q^T H Q) + (1/n) sum_i g_i^T (I - QQ^T) H (I - QQ^T) g_i.

The first term is deterministic given Q and the n = m - 2s remainder samples are
independent given Q, so their sample standard deviation / sqrt(n) is an honest
standard error. Hessians have a few large outlier eigenvalues (Papyan 2020), which the
sketch removes: the error falls like 1/m instead of 1/sqrt(m).

Frobenius norm, the same way for Tr(H^2) = ||H||_F^2 (*derived*, with P_Q = QQ^T and
Pi = I - P_Q idempotent):

    Tr H^2 = Tr(H^2 P_Q) + Tr(H^2 Pi) = ||H Q||_F^2 + E ||H Pi g||^2,

an unbiased estimate of Tr H^2 with a sample standard error; ||H||_F = sqrt(Tr H^2)
gets its standard error by the delta method, se(sqrt X) = se(X) / (2 sqrt X).

All products are done in blocks (``op.matmat``): Hutchinson in one data pass,
Hutch++ and the Frobenius estimator in two (H S; then H [Q, Pi G]). With
``target_rel_stderr`` the remainder keeps getting blocks of fresh probes (one data pass
each) until the relative standard error meets the target or ``max_hvps`` is spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from flatcli.curvature._probes import LinearOperatorLike, gaussian, generator, rademacher
from flatcli.curvature._results import FrobeniusEstimate, StochasticEstimate
from flatcli.errors import UsageError


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """Mean and standard error (sample std with n-1, over sqrt(n)) in float64."""
    x = samples.to(torch.float64)
    return float(x.mean()), float(x.std(correction=1) / math.sqrt(x.numel()))


def _check_adaptive(target_rel_stderr: float | None, max_hvps: int | None) -> None:
    if target_rel_stderr is not None and not target_rel_stderr > 0:
        raise UsageError(f"target_rel_stderr must be positive, got {target_rel_stderr}")
    if max_hvps is not None and max_hvps < 1:
        raise UsageError(f"max_hvps must be positive, got {max_hvps}")


def _grow(
    samples: Tensor,
    new_samples: Callable[[int], Tensor],
    block: int,
    rel_stderr: Callable[[Tensor], float],
    target: float | None,
    budget_left: Callable[[], int],
) -> Tensor:
    """Append blocks of fresh samples while the relative stderr misses ``target``."""
    if target is None:
        return samples
    while rel_stderr(samples) > target:
        n = min(block, budget_left())
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
) -> StochasticEstimate:
    """Tr H by Hutchinson's estimator with Rademacher probes (one data pass per block).

    Args:
        probes: probes in the first block (at least 2, for a standard error).
        seed: seeds the probes (drawn on the operator's device and dtype).
        target_rel_stderr: if set, add blocks of ``probes`` more until
            ``stderr / |value| <= target_rel_stderr`` or ``max_hvps`` is spent.
        max_hvps: the budget for the adaptive mode (default ``10 * probes``).
    """
    if probes < 2:
        raise UsageError(f"need at least 2 probes for a standard error, got {probes}")
    _check_adaptive(target_rel_stderr, max_hvps)
    gen = generator(op, seed)
    budget = max_hvps if max_hvps is not None else 10 * probes
    start = op.hvps

    def new_samples(n: int) -> Tensor:
        g = rademacher(op, n, gen)
        return (g * op.matmat(g)).sum(dim=0)

    def rel(s: Tensor) -> float:
        mean, se = _mean_and_stderr(s)
        return se / abs(mean) if mean != 0 else math.inf

    samples = _grow(
        new_samples(probes), new_samples, probes, rel, target_rel_stderr,
        lambda: budget - (op.hvps - start),
    )
    value, stderr = _mean_and_stderr(samples)
    return StochasticEstimate(
        value=value,
        stderr=stderr,
        hvps=op.hvps - start,
        probes=samples.numel(),
        samples=samples.numel(),
        estimator="hutchinson",
    )


def _sketch(op: LinearOperatorLike, s: int, gen: torch.Generator) -> Tensor:
    """Orthonormal basis Q (P, <= s) of range(H S), S Gaussian (one data pass)."""
    q, _ = torch.linalg.qr(op.matmat(gaussian(op, s, gen)))
    return q


def _deflate(g: Tensor, q: Tensor) -> Tensor:
    """(I - QQ^T) g, applied twice for orthogonality to working precision."""
    g = g - q @ (q.T @ g)
    return g - q @ (q.T @ g)


def _split_budget(probes: int) -> tuple[int, int]:
    """(sketch size s, remainder samples n) for a budget of ``probes`` = 2 s + n HVPs."""
    if probes < 4:
        raise UsageError(
            f"Hutch++ needs a budget of at least 4 products (got {probes})",
            "a third sketches the range, a third projects it, the rest estimate the remainder",
        )
    # At least MIN_REMAINDER Hutchinson samples on the remainder when the budget allows
    # (a sketch of at least 1 is kept): with a handful, an outlying eigenvalue left in the
    # remainder makes the sample standard deviation, hence the reported standard error,
    # run low (bench/sharpness_vs_peers.py, small CNN: with 8 remainder samples the error
    # was 1.5-4x the reported standard error in rms over 30-40 seeds).
    s = probes // 3
    if probes - 2 * s < MIN_REMAINDER:
        s = max(1, min(s, (probes - MIN_REMAINDER) // 2))
    return s, probes - 2 * s


#: The fewest remainder samples Hutch++ takes when its budget allows (see _split_budget).
MIN_REMAINDER = 30


def hutchpp_trace(
    op: LinearOperatorLike,
    *,
    probes: int = 99,
    seed: int = 0,
    target_rel_stderr: float | None = None,
    max_hvps: int | None = None,
) -> StochasticEstimate:
    """Tr H by Hutch++ (Meyer et al. 2021) with a standard error, in two data passes.

    Args:
        probes: the budget of Hessian-vector products, m >= 4: s = m // 3 for the
            sketch, s for the projection, m - 2 s Rademacher probes for the remainder.
        seed: seeds all random vectors (drawn on the operator's device and dtype).
        target_rel_stderr: if set, add blocks of m - 2 s remainder probes until
            ``stderr / |value| <= target_rel_stderr`` or ``max_hvps`` is spent.
        max_hvps: the budget for the adaptive mode (default ``10 * probes``).

    Example:
        >>> import torch
        >>> from flatcli.curvature import CurvatureOperator, hutchpp_trace
        >>> torch.manual_seed(0) and None
        >>> op = CurvatureOperator(torch.nn.Linear(5, 3), torch.randn(40, 5),
        ...                        torch.randint(0, 3, (40,)), dtype=torch.float64)
        >>> est = hutchpp_trace(op, probes=30)
        >>> exact = float(torch.trace(op.matmat(torch.eye(18, dtype=torch.float64))))
        >>> abs(est.value - exact) <= 4 * est.stderr
        True
    """
    s, n = _split_budget(probes)
    _check_adaptive(target_rel_stderr, max_hvps)
    gen = generator(op, seed)
    budget = max_hvps if max_hvps is not None else 10 * probes
    start = op.hvps

    q = _sketch(op, s, gen)
    g = _deflate(rademacher(op, n, gen), q)
    hqg = op.matmat(torch.cat([q, g], dim=1))  # one pass for both blocks
    hq, hg = hqg[:, : q.shape[1]], hqg[:, q.shape[1] :]
    low_rank = float((q * hq).sum(dtype=torch.float64))

    def new_samples(k: int) -> Tensor:
        gk = _deflate(rademacher(op, k, gen), q)
        return (gk * op.matmat(gk)).sum(dim=0)

    def rel(x: Tensor) -> float:
        mean, se = _mean_and_stderr(x)
        return se / abs(low_rank + mean) if low_rank + mean != 0 else math.inf

    samples = _grow(
        (g * hg).sum(dim=0), new_samples, n, rel, target_rel_stderr,
        lambda: budget - (op.hvps - start),
    )
    mean, stderr = _mean_and_stderr(samples)
    return StochasticEstimate(
        value=low_rank + mean,
        stderr=stderr,
        hvps=op.hvps - start,
        probes=s + samples.numel(),
        samples=samples.numel(),
        estimator="hutch++",
    )


def frobenius(
    op: LinearOperatorLike,
    *,
    probes: int = 99,
    seed: int = 0,
    target_rel_stderr: float | None = None,
    max_hvps: int | None = None,
) -> FrobeniusEstimate:
    """||H||_F = sqrt(Tr H^2) by a Hutch++-style estimator of Tr H^2, in two data passes.

    ``Tr H^2 = ||H Q||_F^2 + mean_i ||H (I - QQ^T) g_i||^2`` with Q from the range of
    H S (S Gaussian, s = m // 3 columns) and Rademacher g_i (m - 2 s of them); the first
    term is exact, the second unbiased with a sample standard error. Arguments as for
    :func:`hutchpp_trace`; the adaptive target applies to ``||H||_F``.
    """
    s, n = _split_budget(probes)
    _check_adaptive(target_rel_stderr, max_hvps)
    gen = generator(op, seed)
    budget = max_hvps if max_hvps is not None else 10 * probes
    start = op.hvps

    q = _sketch(op, s, gen)
    g = _deflate(rademacher(op, n, gen), q)
    hqg = op.matmat(torch.cat([q, g], dim=1))
    hq, hg = hqg[:, : q.shape[1]], hqg[:, q.shape[1] :]
    low_rank = float(hq.pow(2).sum(dtype=torch.float64))

    def new_samples(k: int) -> Tensor:
        return op.matmat(_deflate(rademacher(op, k, gen), q)).pow(2).sum(dim=0)

    def summary(x: Tensor) -> tuple[float, float, float, float]:
        mean, se2 = _mean_and_stderr(x)
        squared = low_rank + mean
        value = math.sqrt(max(squared, 0.0))
        return value, (se2 / (2 * value) if value > 0 else math.inf), squared, se2

    def rel(x: Tensor) -> float:
        value, se, _, _ = summary(x)
        return se / value if value > 0 else math.inf

    samples = _grow(
        hg.pow(2).sum(dim=0), new_samples, n, rel, target_rel_stderr,
        lambda: budget - (op.hvps - start),
    )
    value, stderr, squared, squared_stderr = summary(samples)
    return FrobeniusEstimate(
        value=value,
        stderr=stderr,
        squared=squared,
        squared_stderr=squared_stderr,
        hvps=op.hvps - start,
        probes=s + samples.numel(),
        samples=samples.numel(),
    )
