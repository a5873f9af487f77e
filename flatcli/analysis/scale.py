"""The weight-scale mechanism of "Flatness is a False Friend", and measures that see through it.

Granziol (2020, arXiv 2006.09091) explains why L2-regularised solutions look sharper:
for cross-entropy, low-loss solutions with large weights have small Hessians. For
logistic regression ``Tr H = (1/N) sum_i ||x~_i||^2 (1 - ||p_i||^2)`` and scaling the
weights by a > 1 on correctly classified data pushes p_i -> e_{y_i}, so the loss, the
trace, the Frobenius and the spectral norm all shrink (Granziol 2020, sec. 3). Dinh et al.
(2017, "Sharp minima can generalize for deep nets") add that function-preserving
rescalings between ReLU layers make raw Hessian sharpness arbitrary.

This module provides the scaling itself (:func:`scale_weights`) and two measures that
do not fall for it (a third, lambda_max and Tr H times ``||w||^2``, is the measures
``lambda_max_normalised`` and ``trace_normalised`` of :mod:`flatcli.analysis.measures`):

* average-case adaptive sharpness (:func:`adaptive_sharpness`; Kwon et al. 2021;
  Andriushchenko et al. 2023), optionally on normalised logits;
* relative flatness of one layer (:func:`relative_flatness`; Petzka et al. 2021).

Every measure is evaluated on the model in eval mode (BatchNorm running statistics,
dropout off, no augmentation) through ``torch.func.functional_call``; the user's model
is never changed (train/eval flags are restored module by module), and random draws
come from a seeded generator on the parameters' device, in their dtype.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from flatcli.curvature.batches import DataSource, TensorData, as_source
from flatcli.curvature.linalg import mean_and_stderr
from flatcli.curvature.results import Estimate
from flatcli.curvature.trace import MIN_SAMPLES
from flatcli.errors import UsageError

# ----------------------------------------------------------------------------------------
# Scaling the weights


def _all_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def _last_linear(model: nn.Module) -> list[nn.Parameter]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("the model has no Linear layer to scale", hint="use layers='all'")
    return list(linears[-1].parameters())


#: Named selections of parameters for :func:`scale_weights`.
LAYER_SELECTIONS: dict[str, Callable[[nn.Module], list[nn.Parameter]]] = {
    "all": _all_parameters,
    "last": _last_linear,
}


def _selected(model: nn.Module, layers: str) -> list[nn.Parameter]:
    if layers in LAYER_SELECTIONS:
        return LAYER_SELECTIONS[layers](model)
    try:
        module = model.get_submodule(layers)
    except AttributeError:
        names = [n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))]
        raise UsageError(
            f"no layer named {layers!r}",
            hint=f"use {', '.join(map(repr, LAYER_SELECTIONS))} or one of: {', '.join(names)}",
        ) from None
    params = list(module.parameters())
    if not params:
        raise UsageError(f"layer {layers!r} has no parameters")
    return params


def scale_weights(model: nn.Module, factor: float, layers: str = "all") -> nn.Module:
    """A deep copy of ``model`` with the selected weights and biases multiplied by ``factor``.

    ``layers``: ``"all"`` (every parameter, BatchNorm scales and shifts included),
    ``"last"`` (weight and bias of the last ``nn.Linear``), or the qualified name of a
    module (e.g. ``"features.0"``), whose parameters (recursively) are scaled. Buffers
    such as BatchNorm running statistics are left as they are. ``model`` is not changed.

    What scaling does to the function (a > 0):

    * an L-layer ReLU network (Linear/Conv, ReLU, max- or average-pooling) *without*
      biases is positively homogeneous: ``f(x; a w) = a^L f(x; w)``, so the logits scale
      by ``factor^L``;
    * with biases it is not exactly homogeneous: the bias of layer l is scaled by a while
      its input is scaled by a^(l-1), so only the one-layer (logistic regression) case
      scales the logits exactly by ``factor``;
    * a layer feeding a BatchNorm leaves the function unchanged when the normalising
      statistics follow the scale (batch statistics; or running statistics rescaled,
      ignoring BatchNorm's eps), and then ``H(a w) = H(w) / a^2`` for that layer.

    >>> m = nn.Linear(3, 2)
    >>> bool(torch.allclose(scale_weights(m, 2.0).weight, 2 * m.weight))
    True
    """
    if isinstance(factor, bool) or not (
        isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0
    ):
        raise UsageError(f"the scale factor must be a finite number > 0, got {factor!r}")
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for p in _selected(scaled, layers):
            p.mul_(factor)
    return scaled


# ----------------------------------------------------------------------------------------
# Shared evaluation machinery


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, every module's own train/eval flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _first_parameter(model: nn.Module) -> nn.Parameter:
    try:
        return next(model.parameters())
    except StopIteration:
        raise UsageError("the model has no parameters") from None


def _to_model(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """A batch on the model's device; float inputs in the model's dtype."""
    first = _first_parameter(model)
    x = (
        x.to(device=first.device, dtype=first.dtype)
        if x.is_floating_point()
        else x.to(first.device)
    )
    return x, y.to(first.device)


def _prepare_data(
    model: nn.Module,
    inputs: Tensor | Iterable[tuple[Tensor, Tensor]] | DataSource,
    targets: Tensor | None,
    batch_size: int | None,
) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """The data's batches on the model's device, as a function that starts a pass.

    ``(inputs, targets)`` tensors are moved once and cut into ``batch_size`` slices; a
    stream (DataLoader, iterable of batches; see :mod:`flatcli.curvature.batches`) is
    read in its own batches, each moved when read (``batch_size`` does not apply).
    """
    _first_parameter(model)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    source = as_source(inputs, targets)
    if isinstance(source, TensorData):
        moved = TensorData(*_to_model(model, source.inputs, source.targets))
        return lambda: moved.batches(batch_size)
    return lambda: (_to_model(model, x, y) for x, y in source.batches(None))


#: Floor of the logit norm in :func:`normalise_logits` (as in Andriushchenko et al.'s code).
LOGIT_NORM_FLOOR = 1e-10


def normalise_logits(logits: Tensor) -> Tensor:
    """Per-sample centred, unit-norm logits: ``z~ = (z - mean_c z) / max(||z - mean_c z||, 1e-10)``.

    This is the logit normalisation of Andriushchenko et al. (2023, "A modern look at the
    relationship between sharpness and generalization", ICML; code:
    github.com/tml-epfl/sharpness-vs-generalization, ``LogitNormalizationWrapper``).
    Centring leaves the softmax unchanged; the division removes the scale of the output,
    so ``softmax(normalise_logits(a z)) = softmax(normalise_logits(z))`` for every a > 0.
    """
    centred = logits - logits.mean(dim=-1, keepdim=True)
    norms = centred.norm(dim=-1, keepdim=True).clamp_min(LOGIT_NORM_FLOOR)
    normalised: Tensor = centred / norms
    return normalised


def _mean_loss(
    model: nn.Module,
    params: dict[str, Tensor],
    batches: Callable[[], Iterator[tuple[Tensor, Tensor]]],
    logit_normalise: bool,
) -> float:
    """The mean cross-entropy over all batches of one pass (summed in float64)."""
    total: Tensor | float = 0.0
    count = 0
    for x, y in batches():
        logits = functional_call(model, params, (x,))
        if logit_normalise:
            logits = normalise_logits(logits)
        total = total + F.cross_entropy(logits, y, reduction="sum").double()
        count += y.shape[0]
    return float(total) / count


# ----------------------------------------------------------------------------------------
# Adaptive sharpness


@dataclass(frozen=True)
class AdaptiveSharpness:
    """A Monte Carlo estimate of average-case adaptive sharpness, and how it was drawn.

    Attributes:
        estimate: the mean over ``samples`` draws of ``L(w + d) - L(w)`` and its standard
            error (:func:`flatcli.curvature.linalg.mean_and_stderr`), ``kind="stderr"``;
            ``converged`` is False below ``flatcli.curvature.trace.MIN_SAMPLES`` draws,
            where a standard deviation is itself too noisy to be an error bar.
        samples: number of draws.
        rho: relative noise level.
        base_loss: ``L(w)`` (of the normalised logits when ``logit_normalise``).
        logit_normalise: whether the logits were normalised (:func:`normalise_logits`).
        seed: the generator's seed.
    """

    estimate: Estimate
    samples: int
    rho: float
    base_loss: float
    logit_normalise: bool
    seed: int

    @property
    def value(self) -> float:
        """The estimate's value."""
        return self.estimate.value

    @property
    def stderr(self) -> float:
        """The estimate's standard error."""
        return self.estimate.uncertainty


def adaptive_sharpness(
    model: nn.Module,
    inputs: Tensor | Iterable[tuple[Tensor, Tensor]] | DataSource,
    targets: Tensor | None = None,
    *,
    rho: float = 0.05,
    samples: int = 64,
    seed: int = 0,
    logit_normalise: bool = False,
    batch_size: int | None = None,
) -> AdaptiveSharpness:
    """Average-case adaptive sharpness ``E_{d ~ |w| * N(0, rho^2)} [L(w + d) - L(w)]``.

    Each parameter entry w_j is perturbed by ``rho |w_j| eps_j`` with eps_j standard
    normal (elementwise adaptive noise: Kwon et al. 2021, "ASAM: adaptive sharpness-aware
    minimization for scale-invariant learning of deep neural networks", ICML; average case
    as in Andriushchenko et al. 2023, "A modern look at the relationship between sharpness
    and generalization", ICML). L is the mean cross-entropy over ``(inputs, targets)``.
    The expectation is a Monte Carlo mean over ``samples`` draws, reported with its
    standard error (an :class:`~flatcli.curvature.results.Estimate`, not converged below
    ``MIN_SAMPLES`` draws); ``L(w)`` is computed once, exactly.

    Invariance: since the noise scales with |w| entry by entry, any rescaling of
    parameters by positive factors that leaves the function unchanged (moving a scale
    between consecutive ReLU layers, per neuron; scaling a layer that feeds a BatchNorm
    together with its normalising statistics) maps ``w + d`` to the rescaled ``w + d``
    for the same eps, so the value is unchanged draw by draw for the same seed. It is
    *not* invariant to scaling the logits (e.g. all weights of a logistic regression);
    ``logit_normalise=True`` evaluates the cross-entropy of :func:`normalise_logits`
    instead, which removes that scale too.

    All parameters are perturbed, drawn in ``named_parameters`` order from a
    ``torch.Generator(device).manual_seed(seed)`` on the first parameter's device (the
    same seed gives different draws on CPU and CUDA).

    Args:
        rho: relative noise level (> 0).
        samples: Monte Carlo draws (>= 2 for a standard error).
        seed: seed of the noise.
        logit_normalise: use normalised logits (see above).
        batch_size: samples per forward pass (default: all at once).

    ``inputs, targets`` are tensors, or ``inputs`` alone is the data as one object (a
    pair, a DataLoader or a re-iterable of (x, y) batches, read once per evaluation of
    L in its own batches; see :mod:`flatcli.curvature.batches`).
    """
    if not (math.isfinite(rho) and rho > 0):
        raise UsageError(f"rho must be a finite number > 0, got {rho}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise UsageError(f"samples must be an integer >= 2, got {samples!r}")
    batches = _prepare_data(model, inputs, targets, batch_size)
    params = {n: p.detach() for n, p in model.named_parameters()}
    first = _first_parameter(model)
    gen = torch.Generator(device=first.device).manual_seed(int(seed))
    diffs = []
    with eval_mode(model), torch.no_grad():
        base = _mean_loss(model, params, batches, logit_normalise)
        for _ in range(samples):
            noisy = {}
            for name, p in params.items():
                eps = torch.randn(p.shape, generator=gen, device=first.device, dtype=p.dtype).to(
                    p.device
                )
                noisy[name] = p + rho * p.abs() * eps
            diffs.append(_mean_loss(model, noisy, batches, logit_normalise) - base)
    value, stderr = mean_and_stderr(torch.tensor(diffs, dtype=torch.float64))
    estimate = Estimate(
        value=value,
        uncertainty=stderr,
        kind="stderr",
        converged=samples >= MIN_SAMPLES and math.isfinite(stderr),
    )
    return AdaptiveSharpness(
        estimate=estimate,
        samples=samples,
        rho=float(rho),
        base_loss=base,
        logit_normalise=bool(logit_normalise),
        seed=int(seed),
    )


# ----------------------------------------------------------------------------------------
# Relative flatness


def _find_linear(model: nn.Module, layer: str | None) -> tuple[str, nn.Linear]:
    if layer is None:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UsageError("relative flatness needs a Linear layer; the model has none")
        return linears[-1]
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise UsageError(f"no layer named {layer!r}") from None
    if not isinstance(module, nn.Linear):
        raise UsageError(f"layer {layer!r} is a {type(module).__name__}, not a Linear layer")
    return layer, module


def relative_flatness(
    model: nn.Module,
    inputs: Tensor | Iterable[tuple[Tensor, Tensor]] | DataSource,
    targets: Tensor | None = None,
    layer: str | None = None,
    *,
    batch_size: int | None = None,
) -> float:
    """Relative flatness ``kappa = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'})`` of the output layer.

    Petzka, Kamp, Adilova, Sminchisescu & Boley (2021, "Relative flatness and
    generalization", NeurIPS): for a layer with neuron weight rows w_s (C rows of d
    inputs), H_{s,s'} is the d x d block of the Hessian of the mean loss with respect to
    that layer's weight matrix (bias excluded) between rows s and s'.

    For the layer that produces the logits, z_i = W phi_i + b, the loss is a logistic
    regression on the features phi_i, so exactly (A_i = diag p_i - p_i p_i^T)

        H[(s,k),(s',k')] = (1/N) sum_i A_i[s,s'] phi_ik phi_ik',
        Tr(H_{s,s'}) = (1/N) sum_i A_i[s,s'] ||phi_i||^2,
        kappa = sum_{s,s'} (W W^T)[s,s'] Tr(H_{s,s'}),

    which needs one forward pass and no second derivatives. It is invariant to moving a
    common scale between this layer and the one before (W -> W / a, phi -> a phi, as
    with ReLU features), but not to per-neuron rescalings of the features.

    Args:
        layer: qualified name of an ``nn.Linear`` whose output must be the model's
            logits (default: the last Linear layer); otherwise :class:`UsageError`.
        batch_size: samples per forward pass (default: all at once).

    ``inputs, targets``: as in :func:`adaptive_sharpness` (a stream is read once).
    The model runs in eval mode; the result is computed in the model's dtype.
    """
    name, linear = _find_linear(model, layer)
    batches = _prepare_data(model, inputs, targets, batch_size)
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        captured["features"], captured["output"] = args[0], output

    c = linear.out_features
    trace_blocks = torch.zeros(c, c, dtype=linear.weight.dtype, device=linear.weight.device)
    handle = linear.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            count = 0
            for x, y in batches():
                count += y.shape[0]
                captured.clear()
                logits = model(x)
                if "output" not in captured or not torch.equal(captured["output"], logits):
                    raise UsageError(
                        f"layer {name!r} does not produce the model's logits",
                        hint="relative flatness is computed in closed form for the output layer",
                    )
                phi = captured["features"]
                if phi.ndim != 2:
                    raise UsageError(
                        f"layer {name!r} gets inputs of shape {tuple(phi.shape)}, expected (N, d)"
                    )
                p = torch.softmax(logits, dim=1)
                q = phi.pow(2).sum(dim=1)  # ||phi_i||^2
                trace_blocks += torch.diag(q @ p) - (p * q[:, None]).T @ p
    finally:
        handle.remove()
    trace_blocks /= count
    with torch.no_grad():
        w = linear.weight
        return float(((w @ w.T) * trace_blocks).sum())


__all__ = [
    "LAYER_SELECTIONS",
    "LOGIT_NORM_FLOOR",
    "AdaptiveSharpness",
    "adaptive_sharpness",
    "eval_mode",
    "normalise_logits",
    "relative_flatness",
    "scale_weights",
]
