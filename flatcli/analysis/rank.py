"""The Hessian rank: the paper's bound, exact measured ranks and a stochastic estimate.

Granziol (2020, "Flatness is a False Friend", arXiv 2006.09091, claim 4) bounds the rank
of the cross-entropy Hessian of a network with C classes by

    rank(H) <= (C - 1) * sum over parameterised layers l of (fan_in_l + 1),

where fan_in_l is the number of inputs of one neuron of layer l and the +1 is its bias
(Granziol 2020, "Rank bound"). The C - 1 comes from the null
vector 1 of every sample's output Hessian ``diag(p) - p p^T``. Independently of the
architecture, the Gauss-Newton part of H is a sum of N terms of rank <= C - 1, so
``rank(GGN) <= N (C - 1)`` (the *data bound*), and no rank exceeds P.

What is exact and what is not (derived here; tests/test_rank.py checks each case):

* Logistic regression: H is the GGN, ``H = (1/N) sum_i A_i kron x~_i x~_i^T`` with
  ``A_i = diag p_i - p_i p_i^T``, so ``rank(H) <= (C - 1)(d + 1)`` and
  ``rank(H) <= N (C - 1)`` hold exactly (and the first is attained for generic data).
* Deep linear networks: the GGN obeys the bound exactly (its range lies in that of the
  end-to-end logistic regression, rank <= (C - 1)(d + 1)). The *Hessian* adds a residual
  term ``sum_c (p_c - y_c) d^2 z_c / dw^2`` that couples the layers bilinearly; it vanishes
  at stationary points but not elsewhere, and away from them the exact Hessian rank can
  exceed the paper's bound (tests/test_rank.py shows 729 > 702 for 64-12-10 on random
  data). What does hold for two layers (hidden width h) is
  ``rank(H) <= (C - 1)(d + 1) + 2 (C - 1) h``.
* Nonlinear networks: the bound rests on a Kronecker-factored (expectation)
  approximation of each layer's Hessian block. The exact rank can be nearly P; the
  *effective* rank (eigenvalues above a small fraction of lambda_max) is what stays near
  the bound. :func:`flatcli.report.text.rank_statement` says which case applies, with the
  numbers found.

Counting (from :func:`flatcli.models.layer_fan_ins`): a Linear layer's neuron has
``in_features`` inputs; a convolution's neuron is an output channel with
``in_channels / groups * kh * kw`` inputs (weights shared over positions); a BatchNorm
layer's affine scale and shift act per channel on one input, so it counts as a layer
with fan_in 1 (contributing (C - 1) * 2). Residual additions, pooling and activations
have no parameters and are not counted. Every counted layer gets the +1 of the paper's
form, also when it has no bias (the bound is then looser by C - 1 for that layer).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from flatcli.analysis.progress import ProgressCallback, Task
from flatcli.config import (
    RANK_FRACTION,
    RANK_FRACTIONS,
    RANK_ITERATIONS,
    RANK_MAX_PARAMS,
    RANK_PROBES,
    RANK_SEED,
)
from flatcli.curvature.density import slq_density
from flatcli.curvature.exact import exact_spectrum, is_flatcli_logreg, unhooked
from flatcli.curvature.linalg import mean_and_stderr
from flatcli.curvature.operator import CurvatureOperator, memory_bounded
from flatcli.curvature.results import Estimate
from flatcli.curvature.trace import MIN_SAMPLES
from flatcli.distributed import my_shard
from flatcli.errors import TooLargeError, UsageError
from flatcli.models import LayerInfo, layer_fan_ins
from flatcli.models.factory import LogitsOf
from flatcli.models.linear import LogReg
from flatcli.models.mlp import MLP

__all__ = [
    "LINEAR_MODULES",
    "MeasuredRank",
    "RankBound",
    "RankEstimate",
    "RankReport",
    "check_rank_options",
    "default_rank_threshold",
    "effective_rank",
    "estimated_rank",
    "is_linear_model",
    "measured_rank",
    "numerical_rank",
    "rank_bound",
    "rank_report",
]

#: Eigenvalues as a 1-d tensor, array or sequence of numbers.
Eigenvalues = Tensor | npt.ArrayLike

# ----------------------------------------------------------------------------------------
# The bound


@dataclass(frozen=True)
class RankBound:
    """The rank bounds of a model, in absolute numbers and as fractions of P.

    Attributes:
        layers: the parameterised layers counted (name, kind, fan_in, neurons, ...).
        num_classes: C.
        num_samples: N, the number of samples the Hessian is averaged over.
        num_params: P.
        paper_bound: ``(C - 1) * sum_l (fan_in_l + 1)`` (Granziol 2020).
        data_bound: ``N (C - 1)``, exact for the GGN whatever the model.
        min_bound: ``min(paper_bound, data_bound, P)``.
        paper_fraction, data_fraction: the two bounds divided by P (may exceed 1).
        bound_fraction: ``min_bound / P``: the largest fraction of the P directions that
            can carry curvature according to the bounds.
    """

    layers: tuple[LayerInfo, ...]
    num_classes: int
    num_samples: int
    num_params: int
    paper_bound: int
    data_bound: int
    min_bound: int
    paper_fraction: float
    data_fraction: float
    bound_fraction: float


def rank_bound(model: nn.Module, num_classes: int, num_samples: int) -> RankBound:
    """The paper's rank bound and the data bound for ``model`` (see the module docstring).

    >>> b = rank_bound(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10, 200)
    >>> b.paper_bound, b.data_bound, b.num_params, b.min_bound
    (585, 1800, 650, 585)
    """
    for key, value, minimum in (("num_classes", num_classes, 2), ("num_samples", num_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise UsageError(f"{key} must be an integer >= {minimum}, got {value!r}")
    num_classes, num_samples = int(num_classes), int(num_samples)
    layers = tuple(layer_fan_ins(model))
    num_params = sum(p.numel() for p in model.parameters())
    if num_params == 0:
        raise UsageError("the model has no parameters")
    paper = (num_classes - 1) * sum(info.fan_in + 1 for info in layers)
    data = num_samples * (num_classes - 1)
    low = min(paper, data, num_params)
    return RankBound(
        layers=layers,
        num_classes=num_classes,
        num_samples=num_samples,
        num_params=num_params,
        paper_bound=paper,
        data_bound=data,
        min_bound=low,
        paper_fraction=paper / num_params,
        data_fraction=data / num_params,
        bound_fraction=low / num_params,
    )


# ----------------------------------------------------------------------------------------
# Ranks of a spectrum


def _magnitudes(eigenvalues: Eigenvalues) -> np.ndarray:
    values: np.ndarray = np.abs(
        np.asarray(eigenvalues.detach().cpu() if isinstance(eigenvalues, Tensor) else eigenvalues)
    )
    if values.ndim != 1:
        raise UsageError(f"expected a 1-d array of eigenvalues, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise UsageError("the eigenvalues contain NaN or infinity")
    return values


def default_rank_threshold(num_params: int, dtype: npt.DTypeLike = np.float64) -> float:
    """``max(P, 1) * eps(dtype)``: the relative threshold of :func:`numerical_rank`.

    This is numpy.linalg.matrix_rank's default (``S.max() * max(M, N) * eps``, after
    Golub & Van Loan / Numerical Recipes): a backward-stable symmetric eigensolver returns
    the eigenvalues of H + E with ``||E|| ~ P eps ||H||``, so smaller eigenvalues cannot be
    told apart from 0. The dense Hessians here are float64, eps = 2.2e-16.
    """
    return max(int(num_params), 1) * float(np.finfo(dtype).eps)


def numerical_rank(eigenvalues: Eigenvalues, rel_threshold: float | None = None) -> int:
    """Number of eigenvalues with ``|lambda| > rel_threshold * max |lambda|``.

    ``rel_threshold`` defaults to :func:`default_rank_threshold` of the number of
    eigenvalues P and of their dtype (float64 unless a float32/16 array is given).

    >>> numerical_rank([3.0, 1e-3, 1e-20, 0.0])
    2
    """
    raw = (
        eigenvalues.detach().cpu().numpy()
        if isinstance(eigenvalues, Tensor)
        else np.asarray(eigenvalues)
    )
    values = _magnitudes(raw)
    if values.size == 0:
        return 0
    if rel_threshold is None:
        dtype = raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float64
        rel_threshold = default_rank_threshold(values.size, dtype)
    if not rel_threshold >= 0:
        raise UsageError(f"rel_threshold must be >= 0, got {rel_threshold}")
    top = values.max()
    return int((values > rel_threshold * top).sum()) if top > 0 else 0


def effective_rank(
    eigenvalues: Eigenvalues, fractions: Sequence[float] = RANK_FRACTIONS
) -> dict[float, int]:
    """For each fraction f, the number of eigenvalues with ``|lambda| > f * max |lambda|``.

    Magnitudes are used, as for :func:`numerical_rank`: a rank counts directions of
    non-negligible curvature of either sign.

    >>> effective_rank([10.0, 0.5, 0.05, -0.2, 0.0], fractions=(1e-2, 1e-1))
    {0.01: 3, 0.1: 1}
    """
    values = _magnitudes(eigenvalues)
    top = values.max() if values.size else 0.0
    out = {}
    for f in fractions:
        if not 0 < f < 1:
            raise UsageError(f"effective-rank fractions must lie in (0, 1), got {f}")
        out[float(f)] = int((values > f * top).sum()) if top > 0 else 0
    return out


# ----------------------------------------------------------------------------------------
# Exact ranks from dense float64 matrices


@dataclass(frozen=True)
class MeasuredRank:
    """Exact ranks of the dense float64 Hessian and GGN (eval mode, mean cross-entropy).

    Attributes:
        num_params: P.
        num_samples: N.
        threshold: relative threshold of the numerical rank (|lambda| > threshold * max).
        numerical_rank: numerical rank of the Hessian.
        ggn_rank: numerical rank of the generalised Gauss-Newton matrix.
        effective_rank: fraction -> Hessian eigenvalues with |lambda| > fraction * max.
        ggn_effective_rank: the same for the GGN.
        lambda_max: largest Hessian eigenvalue (signed).
        lambda_min: smallest Hessian eigenvalue (signed).
        exact: True: computed from the full spectrum, not estimated.
    """

    num_params: int
    num_samples: int
    threshold: float
    numerical_rank: int
    ggn_rank: int
    effective_rank: dict[float, int]
    ggn_effective_rank: dict[float, int]
    lambda_max: float
    lambda_min: float
    exact: bool = True


def measured_rank(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    threshold: float | None = None,
    fractions: Sequence[float] = RANK_FRACTIONS,
    max_params: int = RANK_MAX_PARAMS,
    progress: ProgressCallback | None = None,
) -> MeasuredRank:
    """Exact Hessian and GGN ranks of the mean cross-entropy on ``(inputs, targets)``.

    Both matrices come from :class:`flatcli.curvature.CurvatureOperator` in float64 and
    eval mode (BatchNorm running statistics, no dropout), and their spectra from
    :func:`flatcli.curvature.exact.exact_spectrum` (dense, symmetrised, ``eigvalsh``);
    ``model`` itself is not changed. All parameters count.

    Args:
        threshold: relative threshold of :func:`numerical_rank`; default
            ``P * eps(float64)`` (:func:`default_rank_threshold`).
        fractions: fractions of max |lambda| for the effective ranks.
        max_params: refuse (:class:`TooLargeError`) above this P: the dense matrices
            take 3 * 8 P^2 bytes and P data passes.
        progress: hears the tasks ``dense hessian`` and ``dense ggn``, P products each.
    """
    check_rank_options(threshold=threshold)
    p = sum(t.numel() for t in model.parameters())
    need = 3 * 8 * p * p
    if p > max_params:
        raise TooLargeError(
            f"an exact rank needs the dense {p:,} x {p:,} Hessian and GGN in float64: "
            f"about {need / 2**30:.2f} GiB and {p:,} Hessian-vector products "
            f"(limit max_params={max_params:,})",
            "use --estimate (stochastic Lanczos quadrature) for a rank estimate",
        )
    if inputs.shape[0] != targets.shape[0] or targets.ndim != 1 or inputs.shape[0] == 0:
        raise UsageError(
            f"inputs and targets must hold the same number (> 0) of samples, got "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    part = my_shard(int(targets.shape[0]))  # torchrun: this process's samples

    def spectrum(curvature: str) -> Tensor:
        op = CurvatureOperator(
            model, inputs[part], targets[part], curvature=curvature, dtype=torch.float64
        )
        task = Task(progress, f"dense {curvature}", op.num_params)
        op.progress = task.update
        eigenvalues = exact_spectrum(op, max_bytes=need)
        task.finish()
        return eigenvalues

    h_eigs, g_eigs = spectrum("hessian"), spectrum("ggn")
    rel = default_rank_threshold(p) if threshold is None else float(threshold)
    return MeasuredRank(
        num_params=p,
        num_samples=int(targets.shape[0]),
        threshold=rel,
        numerical_rank=numerical_rank(h_eigs, rel),
        ggn_rank=numerical_rank(g_eigs, rel),
        effective_rank=effective_rank(h_eigs, fractions),
        ggn_effective_rank=effective_rank(g_eigs, fractions),
        lambda_max=float(h_eigs[-1]),
        lambda_min=float(h_eigs[0]),
    )


# ----------------------------------------------------------------------------------------
# Estimated rank from a stochastic Lanczos quadrature density


@dataclass(frozen=True)
class RankEstimate:
    """An SLQ estimate of the effective rank ``#{i : |lambda_i| > fraction * max |lambda|}``.

    Attributes:
        value: mean over probes of P * (quadrature mass of the nodes above the cut).
        stderr: standard error of the mean of the per-probe estimates
            (:func:`flatcli.curvature.linalg.mean_and_stderr`; NaN with one probe).
        fraction: the cut, relative to the largest |node| (the Lanczos estimate of
            max |lambda|).
        probes: number of probe vectors.
        num_params: P.
        exact: always False: this is an estimate.
    """

    value: float
    stderr: float
    fraction: float
    probes: int
    num_params: int
    exact: bool = False


def _split_probes(nodes: np.ndarray, weights: np.ndarray, probes: int) -> list[slice]:
    """Slices of the concatenated quadratures, one per probe.

    Each probe's nodes are the ascending eigenvalues of its tridiagonal matrix and its
    weights sum to 1, so a probe starts where the nodes descend. Probes that met an
    invariant subspace early have fewer nodes; equal lengths are the fallback when the
    nodes do not descend (e.g. H = c I, where every node is c).
    """
    n = weights.size
    if probes < 1 or n < probes:
        raise UsageError(f"cannot split {n} quadrature nodes among {probes} probes")

    def ok(bounds: list[int]) -> bool:
        pieces = zip(bounds[:-1], bounds[1:], strict=True)
        return all(b > a and abs(weights[a:b].sum() - 1.0) < 1e-3 for a, b in pieces)

    descents = [i + 1 for i in range(n - 1) if nodes[i + 1] < nodes[i]]
    bounds = [0, *descents, n]
    if len(descents) == probes - 1 and ok(bounds):
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if n % probes == 0 and ok(list(range(0, n + 1, n // probes))):
        m = n // probes
        return [slice(k * m, (k + 1) * m) for k in range(probes)]
    raise UsageError(
        f"the {n} quadrature nodes do not split into {probes} probes whose weights each sum to 1"
    )


class Quadrature(Protocol):
    """What :func:`estimated_rank` reads of a density: the concatenated Gauss quadratures
    of its probes (a :class:`flatcli.curvature.results.SpectralDensity`).
    """

    @property
    def nodes(self) -> Tensor: ...

    @property
    def weights(self) -> Tensor: ...

    @property
    def probes(self) -> int: ...


def estimated_rank(
    density: Quadrature, num_params: int, fraction: float = RANK_FRACTION
) -> RankEstimate:
    """Effective-rank estimate from stochastic Lanczos quadrature.

    For a unit probe v, Gauss quadrature gives ``v^T f(H) v ~ sum_i w_i f(theta_i)``; with
    ``f = 1{|t| > c}`` and random v this estimates ``Tr f(H) / P`` (Ubaru & Saad 2016,
    "Fast methods for estimating the numerical rank of large matrices", ICML; Ubaru, Chen
    & Saad 2017, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"). So
    each probe k gives ``r_k = P * sum_{i in k, |theta_i| > c} w_i`` with
    ``c = fraction * max |theta|``; the estimate is the mean of the r_k and its standard
    error their standard deviation over sqrt(probes). Few Lanczos iterations blur the
    step at c (a node can carry mass from both sides of it): the result is an estimate,
    labelled so, never an exact rank.

    Args:
        density: a :class:`flatcli.curvature.results.SpectralDensity` (or any
            :class:`Quadrature`: ``nodes``, ``weights`` and ``probes``).
        num_params: P.
        fraction: the cut relative to the largest |node|, in (0, 1).
    """
    if not 0 < fraction < 1:
        raise UsageError(f"fraction must lie in (0, 1), got {fraction}")
    if (
        isinstance(num_params, bool)
        or not isinstance(num_params, numbers.Integral)
        or num_params < 1
    ):
        raise UsageError(f"num_params must be a positive integer, got {num_params!r}")
    nodes = np.asarray(torch.as_tensor(density.nodes).detach().cpu(), dtype=np.float64).ravel()
    weights = np.asarray(torch.as_tensor(density.weights).detach().cpu(), dtype=np.float64).ravel()
    probes = int(density.probes)
    if nodes.shape != weights.shape:
        raise UsageError(f"{nodes.size} nodes but {weights.size} weights")
    cut = fraction * np.abs(nodes).max()
    above = np.abs(nodes) > cut
    per_probe = torch.tensor(
        [num_params * weights[s][above[s]].sum() for s in _split_probes(nodes, weights, probes)],
        dtype=torch.float64,
    )
    if probes > 1:
        value, stderr = mean_and_stderr(per_probe)
    else:
        value, stderr = float(per_probe.mean()), math.nan
    return RankEstimate(
        value=value,
        stderr=stderr,
        fraction=float(fraction),
        probes=probes,
        num_params=int(num_params),
    )


# ----------------------------------------------------------------------------------------
# Is the model linear? (a registry of module types)

#: Module types whose forward is affine, or a composition of their children, mapped to a
#: predicate on the instance. A model is linear when every module in it is listed and
#: its predicate holds. Subclasses are not trusted (they may override ``forward``).
#: The zoo's logistic regression is the engine's own detector
#: (:func:`flatcli.curvature.exact.is_flatcli_logreg`); the zoo's MLP is linear without
#: hidden layers (depth 0: its ModuleList is then empty); a model of ``--model-factory``,
#: wrapped to pick its logits (:class:`flatcli.models.factory.LogitsOf`), is linear when
#: the user's model is (a linear model returns a tensor, passed on unchanged).
LINEAR_MODULES: dict[type[nn.Module], Callable[[nn.Module], bool]] = {
    nn.Sequential: lambda m: True,
    nn.Flatten: lambda m: True,
    nn.Linear: lambda m: True,
    nn.Identity: lambda m: True,
    nn.ModuleList: lambda m: not list(m.children()),
    LogReg: is_flatcli_logreg,
    MLP: lambda m: isinstance(m, MLP) and not list(m.hidden.children()),
    LogitsOf: lambda m: isinstance(m, LogitsOf) and is_linear_model(m.wrapped),
}


def is_linear_model(model: nn.Module, inputs: Tensor | None = None) -> bool:
    """True when ``model`` computes an affine function of its input.

    Decided from module types (:data:`LINEAR_MODULES`): Sequential, Flatten, Linear and
    Identity, the zoo's logistic regression, an MLP of depth 0, and a ``--model-factory``
    model wrapped to pick its logits when the user's model is linear. Any other module
    (activations, convolutions, BatchNorm, custom classes) makes the answer False, which
    is the safe side: the rank bound is then reported as an approximation. A type only
    vouches for its class's ``forward``: a forward hook (per module or global) or an
    instance attribute ``forward`` can compute anything, so either makes it False too.
    With ``inputs``, the claim is also checked on them (:func:`_affine_on`): a model
    that is not affine there is not linear, whatever its types say.

    >>> is_linear_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2)))
    True
    >>> is_linear_model(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    False
    """
    for module in model.modules():
        check = LINEAR_MODULES.get(type(module))
        if check is None or not check(module):
            return False
    if not unhooked(model):
        return False
    return inputs is None or _affine_on(model, inputs)


def _affine_on(model: nn.Module, inputs: Tensor, samples: int = 8, rtol: float = 1e-9) -> bool:
    """Whether f(t a + (1 - t) b) = t f(a) + (1 - t) f(b) for t = 0.3 and t = 2 (f affine).

    Checked on up to ``samples`` inputs a and seeded Gaussian b, evaluated in float64 on
    a copy in eval mode; to ``rtol`` of the outputs' size (float64 rounding is ~1e-15).
    """
    try:
        net = copy.deepcopy(model).to(torch.float64).eval()
        device = next(net.parameters()).device
        a = inputs[:samples].to(device=device, dtype=torch.float64)
        b = torch.randn(
            a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        ).to(device)
        with torch.no_grad():
            fa, fb = net(a), net(b)
            scale = float(fa.abs().max() + fb.abs().max()) + 1e-300
            for t in (0.3, 2.0):
                gap = net(t * a + (1 - t) * b) - (t * fa + (1 - t) * fb)
                if not float(gap.abs().max()) <= rtol * (1 + abs(t)) * scale:
                    return False
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------
# The bound and the rank of one model on its data


@dataclass(frozen=True)
class RankReport:
    """The bound, the measured (or estimated) rank, and whether the model is linear.

    Its statement in plain words is :func:`flatcli.report.text.rank_statement`.
    """

    bound: RankBound
    measured: MeasuredRank | RankEstimate
    is_linear: bool

    def as_dict(self) -> dict[str, object]:
        """The numbers as JSON (:func:`flatcli.report.text.rank_as_dict` adds the statement).

        ``effective_rank`` has one shape whatever the mode: a list of estimate objects, one
        per fraction, ``{fraction, value, uncertainty, kind, converged}`` (the ``estimate``
        of :mod:`flatcli.report.schema` with its fraction). An exact rank has kind
        ``"exact"`` and uncertainty 0; an SLQ estimate kind ``"stderr"``, its standard error
        (NaN with one probe), and ``converged`` false when that rests on fewer than
        :data:`~flatcli.curvature.trace.MIN_SAMPLES` probes or is not finite, as for every
        standard error (:class:`~flatcli.curvature.results.Estimate`). ``ggn_effective_rank``
        (exact mode only) has the same shape.
        """
        b, m = self.bound, self.measured
        doc: dict[str, object] = {
            "num_params": b.num_params,
            "num_classes": b.num_classes,
            "num_samples": b.num_samples,
            "layers": [
                {"name": i.name, "kind": i.kind, "fan_in": i.fan_in, "neurons": i.neurons}
                for i in b.layers
            ],
            "paper_bound": b.paper_bound,
            "data_bound": b.data_bound,
            "min_bound": b.min_bound,
            "bound_fraction": b.bound_fraction,
            "paper_fraction": b.paper_fraction,
            "linear_model": self.is_linear,
            "exact": m.exact,
        }
        if isinstance(m, MeasuredRank):
            doc.update(
                {
                    "threshold": m.threshold,
                    "numerical_rank": m.numerical_rank,
                    "ggn_rank": m.ggn_rank,
                    "effective_rank": _exact_ranks(m.effective_rank),
                    "ggn_effective_rank": _exact_ranks(m.ggn_effective_rank),
                }
            )
        else:
            doc.update(
                {
                    "numerical_rank": None,
                    "ggn_rank": None,
                    "effective_rank": [
                        {
                            "fraction": m.fraction,
                            **Estimate(
                                value=m.value,
                                uncertainty=m.stderr,
                                kind="stderr",
                                converged=math.isfinite(m.stderr) and m.probes >= MIN_SAMPLES,
                                samples=m.probes,
                            ).as_dict(),
                        }
                    ],
                }
            )
        return doc


def _exact_ranks(ranks: dict[float, int]) -> list[dict[str, object]]:
    """Exact effective ranks as JSON: one estimate object of kind ``"exact"`` per fraction."""
    return [
        {"fraction": f, **Estimate(value=r, uncertainty=0.0, kind="exact").as_dict()}
        for f, r in ranks.items()
    ]


def check_rank_options(
    *,
    threshold: float | None = None,
    fraction: float = RANK_FRACTION,
    probes: int = RANK_PROBES,
    iterations: int = RANK_ITERATIONS,
) -> None:
    """Refuse (:class:`UsageError`) options that cannot be right, before any computation.

    Refused: a ``threshold`` or ``fraction`` outside [0, 1) and (0, 1) (NaN included; 1 or
    more would count no eigenvalue at all), fewer than 1 probe or iteration.
    """
    if threshold is not None and not (0 <= threshold < 1):
        raise UsageError(
            f"threshold must lie in [0, 1) (a fraction of max |lambda|), got {threshold}"
        )
    if not (0 < fraction < 1):
        raise UsageError(f"fraction must lie in (0, 1), got {fraction}")
    for key, value in (("probes", probes), ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{key} must be a positive integer, got {value!r}")


def rank_report(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    num_classes: int,
    *,
    exact: bool | None = None,
    threshold: float | None = None,
    fraction: float = RANK_FRACTION,
    probes: int = RANK_PROBES,
    iterations: int = RANK_ITERATIONS,
    seed: int = RANK_SEED,
    max_params: int = RANK_MAX_PARAMS,
    progress: ProgressCallback | None = None,
) -> RankReport:
    """Bound and rank of ``model``'s Hessian on the data.

    Exact (:func:`measured_rank`) when P <= ``max_params`` or when ``exact`` is True
    (then up to twice :data:`~flatcli.config.RANK_MAX_PARAMS`), else an SLQ estimate of the effective
    rank (:func:`estimated_rank`). Every option is checked (:func:`check_rank_options`)
    before anything is computed. ``progress`` hears the dense matrices' products
    (:func:`measured_rank`) or the SLQ run's (``probes`` x ``iterations`` at most).
    """
    check_rank_options(threshold=threshold, fraction=fraction, probes=probes, iterations=iterations)
    bound = rank_bound(model, num_classes, len(targets))
    use_exact = bound.num_params <= max_params if exact is None else exact
    if exact:  # asked for explicitly: allow twice the default size before refusing
        max_params = max(max_params, 2 * RANK_MAX_PARAMS)
    if use_exact:
        measured: MeasuredRank | RankEstimate = measured_rank(
            model, inputs, targets, threshold=threshold, max_params=max_params, progress=progress
        )
    else:
        part = my_shard(len(targets))  # torchrun: this process's samples
        op = CurvatureOperator(
            model, inputs[part], targets[part], **memory_bounded(model, inputs[part])
        )
        # K probes x m steps; a probe whose Krylov space is invariant stops sooner
        task = Task(
            progress, "SLQ rank estimate", probes * min(iterations, op.num_params), up_to=True
        )
        op.progress = task.update
        density = slq_density(op, probes=probes, iterations=iterations, seed=seed)
        task.finish()
        measured = estimated_rank(density, bound.num_params, fraction)
    return RankReport(bound, measured, is_linear_model(model, inputs))
