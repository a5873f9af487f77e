"""Frozen result types of the curvature estimators.

Every estimator returns one of these: plain numbers (Python floats and tuples) plus the
number of Hessian-vector products (``hvps``) it spent, so that a renderer can print them
and a benchmark can compare costs without knowing which algorithm produced them.
Tensors that are returned (spectral densities, Ritz vectors) live on the CPU in float64,
except Ritz vectors, which stay on the operator's device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A measured number and its uncertainty: a rigorous bound (eigenvalues) or a
    standard error (stochastic estimates); 0 for exact values.

    ``converged=False`` says the uncertainty is NOT what its kind promises:

    * a Lanczos run that stopped (``--max-iter``) before every wanted Ritz residual met
      ``tol``: the residual only says that SOME eigenvalue lies within it of the value,
      not that the largest (smallest) one does, and an early Ritz value typically lies
      well inside the spectrum;
    * a standard error from fewer than ``flatcli.curvature.trace.MIN_SAMPLES`` samples
      (Hutch++ with ``--probes`` under 13, adaptive sharpness with fewer Monte Carlo
      draws), which may be many times too small, or that missed ``--target-stderr``.

    Such a value is shown as "not converged", never as a bound or a standard error, and
    ``compare`` gives no verdict on it. Measures derived from others (``spectral_norm``,
    ``*_normalised``) inherit the flag.
    """

    value: float
    uncertainty: float
    kind: str  # "bound", "stderr" or "exact"
    hvps: int = 0
    converged: bool = True
    #: Measures computed by the same run, whose products ``hvps`` already counts (the two
    #: ends of one Lanczos run; trace and Frobenius norm from one set of probes).
    shared_with: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, float | bool]:
        key = "bound" if self.kind in ("bound", "exact") else "stderr"
        return {"value": self.value, key: self.uncertainty, "converged": self.converged}


@dataclass(frozen=True)
class LanczosResult:
    """Ritz values of a Lanczos run and their residual bounds.

    Attributes:
        eigenvalues: the wanted Ritz values theta_i, ascending.
        residuals: ``||H y_i - theta_i y_i||`` for each Ritz pair (aligned with
            ``eigenvalues``). For symmetric H some eigenvalue lies within this distance
            of theta_i: ``min_j |lambda_j - theta_i| <= residual_i`` (Parlett 1998, Thm 4.5.1).
        iterations: Lanczos steps taken (size of the tridiagonal matrix).
        hvps: Hessian-vector products spent (one per step).
        converged: every wanted residual met ``tol`` (relative), or the Krylov space
            became invariant (then the Ritz values are eigenvalues up to rounding).
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        vectors: Ritz vectors (P, len(eigenvalues)) when asked for, else ``None``.
    """

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    iterations: int
    hvps: int
    converged: bool
    which: str
    vectors: Tensor | None = None


@dataclass(frozen=True)
class EigenEstimate:
    """One extreme eigenvalue: ``|lambda - value| <= bound`` for some eigenvalue lambda.

    ``hvps`` is the cost of the Lanczos run that produced it (shared when one run gave
    both extremes, see :func:`flatcli.curvature.lanczos.extreme_eigenvalues`).
    """

    value: float
    bound: float
    hvps: int
    converged: bool


@dataclass(frozen=True)
class StochasticEstimate:
    """A randomised estimate with its standard error.

    Attributes:
        value: the estimate (e.g. of Tr H).
        stderr: standard error of ``value``: sample standard deviation of the
            ``samples`` independent Hutchinson terms over ``sqrt(samples)`` (the
            deterministic low-rank part of Hutch++ adds nothing).
        hvps: Hessian-vector products spent.
        probes: random vectors drawn (sketch plus Hutchinson probes).
        samples: Hutchinson samples behind ``stderr``.
        estimator: ``"hutchinson"`` or ``"hutch++"``.
        converged: whether ``stderr`` can be trusted as the uncertainty: it rests on at
            least ``flatcli.curvature.trace.MIN_SAMPLES`` samples (or there is nothing
            left to sample: the estimate is exact), and a ``target_rel_stderr`` that was
            asked for was met. False: ``value`` and ``stderr`` are reported, but the
            error may be many times ``stderr`` (a standard deviation of 2 or 3 samples is
            itself a wild guess).
    """

    value: float
    stderr: float
    hvps: int
    probes: int
    samples: int
    estimator: str
    converged: bool = True

    @property
    def rel_stderr(self) -> float:
        """``stderr / |value|`` (``inf`` when the value is 0)."""
        return self.stderr / abs(self.value) if self.value != 0 else float("inf")


@dataclass(frozen=True)
class FrobeniusEstimate:
    """An estimate of ``||H||_F = sqrt(Tr H^2)`` and of ``Tr H^2`` itself.

    ``squared`` is unbiased for Tr H^2; ``value = sqrt(squared)`` is slightly biased low
    (Jensen), by O(stderr^2 / value). ``stderr`` follows from ``squared_stderr`` by the
    delta method: ``stderr = squared_stderr / (2 value)``. ``converged`` as for
    :class:`StochasticEstimate`.
    """

    value: float
    stderr: float
    squared: float
    squared_stderr: float
    hvps: int
    probes: int
    samples: int
    converged: bool = True

    @property
    def rel_stderr(self) -> float:
        """``stderr / value`` (``inf`` when the value is 0)."""
        return self.stderr / self.value if self.value != 0 else float("inf")


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density from stochastic Lanczos quadrature.

    ``phi(t) = (1/probes) sum_k sum_i weights_ki N(t; nodes_ki, sigma^2)``, sampled on
    ``grid``; ``values`` integrate to 1 over ``grid`` (trapezoid rule).

    Attributes:
        grid: evaluation points (grid_size,), float64, CPU.
        values: density at ``grid`` (grid_size,), float64, CPU.
        nodes: Gauss quadrature nodes (Ritz values) of all probes, concatenated.
        weights: matching weights; each probe's weights sum to 1, so
            ``sum(weights * nodes) / probes`` estimates Tr(H) / P.
        sigma: Gaussian broadening width.
        hvps: Hessian-vector products spent.
        probes: number of random start vectors.
        iterations: Lanczos steps per probe (the largest, if some probe stopped early
            on an invariant subspace).
    """

    grid: Tensor
    values: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    hvps: int
    probes: int
    iterations: int

    def moment(self, order: int) -> float:
        """Quadrature estimate of ``Tr(H^order) / P`` (exact in expectation for
        ``order <= 2 * iterations - 1``).
        """
        return float((self.weights * self.nodes**order).sum() / self.probes)

    @property
    def mean(self) -> float:
        """Estimate of Tr(H) / P."""
        return self.moment(1)
