"""The Hessian rank: the paper's bound, exact measured ranks and a stochastic estimate.

Granziol (2020, "Flatness is a False Friend", arXiv 2006.09091, claim 4) bounds the rank
of the cross-entropy Hessian of a network with C classes by

    rank(H) <= (C - 1) * sum over parameterised layers l of (fan_in_l + 1),

where fan_in_l is the number of inputs of one neuron of layer l and the +1 is its bias
(docs/paper.md, "Rank bound, the form flatcli uses"). The C - 1 comes from the null
vector 1 of every sample's output Hessian ``diag(p) - p p^T``. Independently of the
architecture, the Gauss-Newton part of H is a sum of N terms of rank <= C - 1, so
``rank(GGN) <= N (C - 1)`` (the *data bound*), and no rank exceeds P.

What is exact and what is not (derived, see docs/paper.md and the tests):

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
  the bound. :func:`rank_statement` says which case applies, with the numbers found.

Counting (from :func:`flatcli.models.layer_fan_ins`): a Linear layer's neuron has
``in_features`` inputs; a convolution's neuron is an output channel with
``in_channels / groups * kh * kw`` inputs (weights shared over positions); a BatchNorm
layer's affine scale and shift act per channel on one input, so it counts as a layer
with fan_in 1 (contributing (C - 1) * 2). Residual additions, pooling and activations
have no parameters and are not counted. Every counted layer gets the +1 of the paper's
form, also when it has no bias (the bound is then looser by C - 1 for that layer).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from flatcli.distributed import my_shard
from flatcli.errors import TooLargeError, UsageError
from flatcli.models import LayerInfo, layer_fan_ins

#: Default fractions of lambda_max for the effective rank.
DEFAULT_FRACTIONS: tuple[float, ...] = (1e-2, 1e-3)

#: Largest P for which :func:`measured_rank` builds dense Hessian and GGN matrices
#: (two P x P float64 matrices plus an eigensolver copy: 3 * 8 * 4096^2 B = 384 MiB).
DEFAULT_MAX_PARAMS = 4096

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


def _magnitudes(eigenvalues: Any) -> np.ndarray:
    values = np.abs(
        np.asarray(eigenvalues.detach().cpu() if isinstance(eigenvalues, Tensor) else eigenvalues)
    )
    if values.ndim != 1:
        raise UsageError(f"expected a 1-d array of eigenvalues, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise UsageError("the eigenvalues contain NaN or infinity")
    return values


def default_rank_threshold(num_params: int, dtype: Any = np.float64) -> float:
    """``max(P, 1) * eps(dtype)``: the relative threshold of :func:`numerical_rank`.

    This is numpy.linalg.matrix_rank's default (``S.max() * max(M, N) * eps``, after
    Golub & Van Loan / Numerical Recipes): a backward-stable symmetric eigensolver returns
    the eigenvalues of H + E with ``||E|| ~ P eps ||H||``, so smaller eigenvalues cannot be
    told apart from 0. The dense Hessians here are float64, eps = 2.2e-16.
    """
    return max(int(num_params), 1) * float(np.finfo(dtype).eps)


def numerical_rank(eigenvalues: Any, rel_threshold: float | None = None) -> int:
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
    eigenvalues: Any, fractions: Sequence[float] = DEFAULT_FRACTIONS
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
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    max_params: int = DEFAULT_MAX_PARAMS,
) -> MeasuredRank:
    """Exact Hessian and GGN ranks of the mean cross-entropy on ``(inputs, targets)``.

    Both matrices come from :class:`flatcli.curvature.CurvatureOperator` in float64 and
    eval mode (BatchNorm running statistics, no dropout), applied to blocks of unit
    vectors (:func:`flatcli.curvature.dense_hessian`); ``model`` itself is not changed.
    Both are symmetrised and their eigenvalues computed with ``torch.linalg.eigvalsh``.
    All parameters count.

    Args:
        threshold: relative threshold of :func:`numerical_rank`; default
            ``P * eps(float64)`` (:func:`default_rank_threshold`).
        fractions: fractions of max |lambda| for the effective ranks.
        max_params: refuse (:class:`TooLargeError`) above this P: the dense matrices
            take 3 * 8 P^2 bytes and P data passes.
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
    from flatcli.curvature import CurvatureOperator, dense_hessian

    part = my_shard(
        int(targets.shape[0])
    )  # torchrun: this process's samples (see measures.measure)

    def spectrum(curvature: str) -> Tensor:
        op = CurvatureOperator(
            model, inputs[part], targets[part], curvature=curvature, dtype=torch.float64
        )
        h = dense_hessian(op, max_bytes=need)
        return torch.linalg.eigvalsh(0.5 * (h + h.T))

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
        stderr: standard deviation of the per-probe estimates over sqrt(probes)
            (NaN with one probe).
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
        pieces = zip(bounds[:-1], bounds[1:])
        return all(b > a and abs(weights[a:b].sum() - 1.0) < 1e-3 for a, b in pieces)

    descents = [i + 1 for i in range(n - 1) if nodes[i + 1] < nodes[i]]
    bounds = [0, *descents, n]
    if len(descents) == probes - 1 and ok(bounds):
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if n % probes == 0 and ok(list(range(0, n + 1, n // probes))):
        m = n // probes
        return [slice(k * m, (k + 1) * m) for k in range(probes)]
    raise UsageError(
        f"the {n} quadrature nodes do not split into {probes} probes whose weights each sum to 1"
    )


def estimated_rank(density: Any, num_params: int, fraction: float = 1e-2) -> RankEstimate:
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
        density: a :class:`flatcli.curvature.SpectralDensity` (or any object with
            ``nodes``, ``weights`` and ``probes``).
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
    per_probe = np.array(
        [num_params * weights[s][above[s]].sum() for s in _split_probes(nodes, weights, probes)]
    )
    stderr = float(per_probe.std(ddof=1) / math.sqrt(probes)) if probes > 1 else math.nan
    return RankEstimate(
        value=float(per_probe.mean()),
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
LINEAR_MODULES: dict[type, Callable[[nn.Module], bool]] = {
    nn.Sequential: lambda m: True,
    nn.Flatten: lambda m: True,
    nn.Linear: lambda m: True,
    nn.Identity: lambda m: True,
}


def _register_zoo() -> None:
    from flatcli.models.linear import LogReg
    from flatcli.models.mlp import MLP

    LINEAR_MODULES.setdefault(LogReg, lambda m: True)
    # the MLP is linear without hidden layers (depth 0): its ModuleList is then empty
    LINEAR_MODULES.setdefault(MLP, lambda m: len(m.hidden) == 0)
    LINEAR_MODULES.setdefault(nn.ModuleList, lambda m: len(m) == 0)
    from flatcli.models.factory import LogitsOf

    # a model of --model-factory, wrapped to pick its logits: linear when the user's model is
    # (a linear model returns a tensor, which the wrapper passes on unchanged)
    LINEAR_MODULES.setdefault(LogitsOf, lambda m: is_linear_model(m.wrapped))


_register_zoo()


def is_linear_model(model: nn.Module, inputs: Tensor | None = None) -> bool:
    """True when ``model`` computes an affine function of its input.

    Decided from module types (:data:`LINEAR_MODULES`): Sequential, Flatten, Linear and
    Identity, the zoo's logistic regression, and an MLP of depth 0. Any other module
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
    from flatcli.curvature.exact import unhooked

    for module in model.modules():
        check = LINEAR_MODULES.get(type(module))
        if check is None or not check(module):
            return False
    if not unhooked(model):
        return False
    return inputs is None or _affine_on(model, inputs)


def _affine_on(model: nn.Module, inputs: Tensor, samples: int = 8, rtol: float = 1e-9) -> bool:
    """f(t a + (1 - t) b) = t f(a) + (1 - t) f(b) for t = 0.3 and t = 2 (an affine f),
    on up to ``samples`` inputs a and seeded Gaussian b, evaluated in float64 on a copy
    in eval mode; to ``rtol`` of the outputs' size (float64 rounding is ~1e-15).
    """
    import copy

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
# Plain words

Measured = Union[MeasuredRank, RankEstimate]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _effective_words(ranks: Mapping[float, int], bound: int) -> str:
    parts = []
    for f, r in ranks.items():
        rel = "within" if r <= bound else "above"
        parts.append(f"{r} above {f:g} lambda_max ({rel} the bound)")
    return "; ".join(parts)


def rank_statement(bound: RankBound, measured: Measured, is_linear: bool) -> str:
    """What the measured rank says about the bound, in plain words and with the numbers.

    Linear models: the bound is exact for the Gauss-Newton matrix (and for the Hessian
    of a one-layer model, where the two coincide), so a measured GGN rank above it is a
    contradiction and is reported loudly. For a multi-layer linear model the Hessian also
    has the bilinear residual term, which may raise its rank above the bound away from a
    stationary point; that is said, not hidden. Nonlinear models: the bound holds for the
    effective rank under the Kronecker-factored approximation; the exact rank may exceed it.
    """
    p, b = bound.num_params, bound.paper_bound
    head = (
        f"Rank bound (C-1) * sum(fan_in+1) = {bound.num_classes - 1} x "
        f"{sum(i.fan_in + 1 for i in bound.layers)} = {b:,} ({_pct(bound.paper_fraction)} of "
        f"P = {p:,}); data bound N(C-1) = {bound.data_bound:,}; smallest bound {bound.min_bound:,} "
        f"({_pct(bound.bound_fraction)} of P)."
    )
    one_layer = len(bound.layers) == 1
    lines = [head]
    if isinstance(measured, RankEstimate):
        low, high = measured.value - 2 * measured.stderr, measured.value + 2 * measured.stderr
        err = (
            f"+- {measured.stderr:,.1f}"
            if math.isfinite(measured.stderr)
            else "(no error bar: one probe)"
        )
        lines.append(
            f"Estimated effective rank (SLQ, {measured.probes} probes, |lambda| > {measured.fraction:g} "
            f"lambda_max): {measured.value:,.1f} {err}; an estimate, not an exact rank."
        )
        over = math.isfinite(low) and low > bound.min_bound
        if is_linear and over:
            lines.append(
                f"WARNING: for a linear model the estimate exceeds the bound {bound.min_bound:,} by more "
                f"than 2 standard errors ({low:,.1f} .. {high:,.1f}): either the quadrature is too "
                "coarse (raise --iterations) or something is wrong."
            )
        elif is_linear:
            lines.append("Linear model: the bound is exact; the estimate is consistent with it.")
        else:
            where = (
                "above" if over else ("within" if high <= bound.min_bound else "consistent with")
            )
            lines.append(
                f"Nonlinear model: the bound holds for the effective rank only under the "
                f"Kronecker-factored approximation; the estimate is {where} it."
            )
        return " ".join(lines)

    m = measured
    found = (
        f"Exact (dense float64, |lambda| > {m.threshold:.2g} max|lambda|): Hessian rank "
        f"{m.numerical_rank:,} ({_pct(m.numerical_rank / p)} of P), GGN rank {m.ggn_rank:,}; "
        f"effective Hessian rank: {_effective_words(m.effective_rank, b)}."
    )
    lines.append(found)
    if is_linear:
        if m.ggn_rank > bound.min_bound:
            lines.append(
                f"WARNING: this is a linear model, for which the bound is exact, yet the GGN rank "
                f"{m.ggn_rank:,} EXCEEDS the bound {bound.min_bound:,}. That contradicts the theory: "
                "check the threshold or report a bug."
            )
        elif m.numerical_rank > bound.min_bound and one_layer:
            lines.append(
                f"WARNING: for this one-layer linear model the Hessian equals the GGN, yet its rank "
                f"{m.numerical_rank:,} EXCEEDS the bound {bound.min_bound:,}: numerical noise above "
                "the threshold, or a bug."
            )
        elif m.numerical_rank > bound.min_bound:
            lines.append(
                f"Linear model: the GGN rank {m.ggn_rank:,} obeys the exact bound, but the Hessian rank "
                f"{m.numerical_rank:,} exceeds it by {m.numerical_rank - bound.min_bound:,}: the residual "
                "term sum_c (p_c - y_c) d2z_c/dw2 couples the layers and only vanishes at a stationary "
                "point, so the paper's bound does not hold for this Hessian here."
            )
        else:
            lines.append(
                f"Linear model: the bound is exact and the measured ranks obey it "
                f"({m.numerical_rank:,} <= {bound.min_bound:,})."
            )
    else:
        verdict = (
            f"exceeds it by {m.numerical_rank - b:,}" if m.numerical_rank > b else "is within it"
        )
        lines.append(
            f"Nonlinear model: the bound holds for the effective rank under the Kronecker-factored "
            f"approximation, not for the exact rank; the exact Hessian rank {verdict}."
        )
    return " ".join(lines)


__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_MAX_PARAMS",
    "LINEAR_MODULES",
    "MeasuredRank",
    "RankBound",
    "RankEstimate",
    "default_rank_threshold",
    "effective_rank",
    "estimated_rank",
    "is_linear_model",
    "measured_rank",
    "numerical_rank",
    "rank_bound",
    "rank_statement",
]


# ----------------------------------------------------------------------------------------
# The report behind ``flatcli rank-bound``


@dataclass(frozen=True)
class RankReport:
    """The bound, the measured (or estimated) rank and the plain-words statement."""

    bound: RankBound
    measured: MeasuredRank | RankEstimate
    statement: str
    is_linear: bool

    def as_dict(self) -> dict:
        b, m = self.bound, self.measured
        doc: dict[str, Any] = {
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
                    "effective_rank": {f"{k:g}": v for k, v in m.effective_rank.items()},
                    "ggn_effective_rank": {f"{k:g}": v for k, v in m.ggn_effective_rank.items()},
                }
            )
        else:
            doc.update(
                {
                    "numerical_rank": None,
                    "ggn_rank": None,
                    "effective_rank": {f"{m.fraction:g}": {"value": m.value, "stderr": m.stderr}},
                }
            )
        doc["statement"] = self.statement
        return doc


def check_rank_options(
    *, threshold: float | None = None, fraction: float = 1e-2, probes: int = 8, iterations: int = 80
) -> None:
    """Refuse (:class:`UsageError`) options that cannot be right, before any computation:
    a ``threshold`` or ``fraction`` outside [0, 1) and (0, 1) (NaN included; 1 or more
    would count no eigenvalue at all), fewer than 1 probe or iteration.
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
    fraction: float = 1e-2,
    probes: int = 8,
    iterations: int = 80,
    seed: int = 0,
    max_params: int = DEFAULT_MAX_PARAMS,
) -> RankReport:
    """Bound and rank of ``model``'s Hessian on the data; exact when P <= ``max_params``
    (or when ``exact`` is True), else an SLQ estimate of the effective rank.

    Every option is checked (:func:`check_rank_options`) before anything is computed.
    """
    check_rank_options(threshold=threshold, fraction=fraction, probes=probes, iterations=iterations)
    bound = rank_bound(model, num_classes, len(targets))
    use_exact = bound.num_params <= max_params if exact is None else exact
    if exact:  # asked for explicitly: allow twice the default size before refusing
        max_params = max(max_params, 2 * DEFAULT_MAX_PARAMS)
    if use_exact:
        measured: MeasuredRank | RankEstimate = measured_rank(
            model, inputs, targets, threshold=threshold, max_params=max_params
        )
    else:
        from flatcli.curvature import CurvatureOperator, memory_bounded, slq_density

        part = my_shard(len(targets))  # torchrun: this process's samples
        op = CurvatureOperator(
            model, inputs[part], targets[part], **memory_bounded(model, inputs[part])
        )
        density = slq_density(op, probes=probes, iterations=iterations, seed=seed)
        measured = estimated_rank(density, bound.num_params, fraction)
    linear = is_linear_model(model, inputs)
    return RankReport(bound, measured, rank_statement(bound, measured, linear), linear)
