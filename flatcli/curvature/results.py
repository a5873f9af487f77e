"""Frozen result types of the curvature estimators.

Every estimator returns one of these: plain numbers (Python floats and tuples) plus the
number of Hessian-vector products (``hvps``) it spent, so that a renderer can print them
and a benchmark can compare costs without knowing which algorithm produced them. A number
with its uncertainty is always an :class:`Estimate`, whichever estimator made it.
Tensors that are returned (spectral densities, Ritz vectors) live on the CPU in float64,
except Ritz vectors, which stay on the operator's device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

#: What an uncertainty promises: a rigorous bound, a standard error, or nothing (exact).
EstimateKind = Literal["bound", "stderr", "exact"]

#: Which bound a wanted Ritz value reports: the gap (Kato-Temple) or the residual.
BoundKind = Literal["gap", "residual"]


@dataclass(frozen=True)
class Estimate:
    """A measured number and its uncertainty: the value every estimator and measure returns.

    ``kind`` says what ``uncertainty`` is: a rigorous ``"bound"`` (a Ritz residual:
    some eigenvalue lies within it of ``value``), a ``"stderr"`` (the standard error of a
    stochastic estimate), or 0 for an ``"exact"`` value.

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

    Attributes:
        value: the estimate.
        uncertainty: the bound or standard error (0 for an exact value).
        kind: ``"bound"``, ``"stderr"`` or ``"exact"``.
        hvps: Hessian-vector products spent on it. In a report, work shared by several
            measures is counted once, on the first of them (see ``shared_with``).
        converged: whether ``uncertainty`` is what ``kind`` promises (above).
        shared_with: the other measures of a report that came from the same products
            (the two ends of one Lanczos run; trace and Frobenius norm from one set of
            probes; a normalised measure and its base); their cost is in the ``hvps`` of
            the first of them, the others have ``hvps=0``.
        samples: independent samples behind a standard error (0 otherwise).
        squared: for ``||H||_F`` from :func:`flatcli.curvature.trace.trace_and_frobenius`,
            the unbiased estimate of ``Tr H^2`` whose square root ``value`` is (slightly
            biased low, by O(stderr^2 / value), Jensen; ``uncertainty`` follows from
            ``squared.uncertainty`` by the delta method, ``se / (2 value)``).
    """

    value: float
    uncertainty: float
    kind: EstimateKind
    hvps: int = 0
    converged: bool = True
    shared_with: tuple[str, ...] = ()
    samples: int = 0
    squared: Estimate | None = None

    @property
    def relative_uncertainty(self) -> float:
        """``uncertainty / |value|`` (``inf`` when the value is 0)."""
        return self.uncertainty / abs(self.value) if self.value != 0 else math.inf

    def as_dict(self) -> dict[str, float | str | bool]:
        """The JSON form, one shape for every kind: ``value``, ``uncertainty``, ``kind``
        (``"bound"``, ``"stderr"`` or ``"exact"``) and ``converged``; the ``estimate`` of
        every command's document (:mod:`flatcli.report.schema`).
        """
        return {
            "value": self.value,
            "uncertainty": self.uncertainty,
            "kind": self.kind,
            "converged": self.converged,
        }


@dataclass(frozen=True)
class LanczosResult:
    """Ritz values of a Lanczos run and their error bounds.

    Attributes:
        eigenvalues: the wanted Ritz values theta_i, ascending.
        residuals: ``||H y_i - theta_i y_i||`` for each Ritz pair (aligned with
            ``eigenvalues``; below float64 widened by the operator's rounding). For
            symmetric H some eigenvalue lies within this distance of theta_i:
            ``min_j |lambda_j - theta_i| <= residual_i`` (Parlett 1998, Thm 4.5.1).
        bounds: the error bound of each wanted Ritz value: the gap bound r^2 / delta
            where its assumption could be checked, else the residual (module docstring of
            :mod:`flatcli.curvature.lanczos`); never larger than ``residuals``.
        bound_kinds: what each entry of ``bounds`` finally is: ``"gap"``, or
            ``"residual"`` (the Ritz residual, or below float64 the re-check's residual
            where that replaced a smaller gap bound).
        iterations: Lanczos steps taken (size of the tridiagonal matrix).
        hvps: Hessian-vector products spent (one per step, plus the float64 re-check).
        converged: every wanted bound met ``tol`` (relative), or the Krylov space
            became invariant (then the Ritz values are eigenvalues up to rounding).
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        vectors: Ritz vectors (P, len(eigenvalues)) when asked for, else ``None``.
    """

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    bounds: tuple[float, ...]
    bound_kinds: tuple[BoundKind, ...]
    iterations: int
    hvps: int
    converged: bool
    which: str
    vectors: Tensor | None = None


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
