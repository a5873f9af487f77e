"""The model registry: names -> builders, keyword checking, and per-layer fan-ins.

Every model of the zoo is a class registered with :func:`register`. Its keyword-only
constructor arguments, other than ``input_shape`` and ``num_classes``, *are* its
configuration: their defaults become :attr:`ModelSpec.defaults`, so there is one source
of truth. :func:`resolve_kwargs` merges a user's keywords with those defaults and checks
names and types; the result is plain JSON, which is what a checkpoint records so that
``build_model(name, input_shape=..., num_classes=..., **resolved)`` rebuilds the same
architecture.

:func:`layer_fan_ins` lists the parameterised layers of any model for the Hessian rank
bound of the paper (Granziol 2020, "Flatness is a False Friend", arXiv 2006.09091):
``rank(H) <= (C - 1) * sum over layers of neurons * (fan_in + 1)``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from flatcli.errors import FlatcliError, UnknownNameError, UsageError

# ----------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the zoo.

    ``builder(input_shape=..., num_classes=..., **kwargs)`` returns the ``nn.Module``;
    ``defaults`` maps every keyword the builder accepts to its default value.
    """

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any]
    help: str


MODELS: dict[str, ModelSpec] = {}

# Types a model keyword may have: these survive a JSON round trip unchanged.
_JSON_SCALARS = (bool, int, float, str)


def register(name: str, help: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a model to :data:`MODELS` under ``name``.

    The class must take ``input_shape`` and ``num_classes`` plus keyword-only arguments
    that all have JSON scalar defaults (bool, int, float or str).
    """

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        defaults = {}
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name in ("self", "input_shape", "num_classes"):
                continue
            if p.kind is not p.KEYWORD_ONLY or p.default is p.empty:
                raise TypeError(
                    f"{cls.__name__}: argument {p.name!r} must be keyword-only with a default"
                )
            if not isinstance(p.default, _JSON_SCALARS):
                raise TypeError(f"{cls.__name__}: default of {p.name!r} is not a JSON scalar")
            defaults[p.name] = p.default
        MODELS[name] = ModelSpec(name=name, builder=cls, defaults=defaults, help=help)
        return cls

    return decorate


def model_names() -> list[str]:
    """Names of the registered models, in registration order."""
    return list(MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UnknownNameError(
            f"unknown model {name!r}", hint=f"choose one of: {', '.join(MODELS)}"
        )
    return MODELS[name]


def _coerce(model: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default``, or a UsageError."""
    kind = type(default)
    ok = value
    if kind is bool:
        ok = value if isinstance(value, bool) else None
    elif kind is int:
        ok = (
            int(value)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool)
            else None
        )
    elif kind is float:
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        ok = float(value) if real and math.isfinite(value) else None
    elif kind is str:
        ok = value if isinstance(value, str) else None
    if ok is None:
        raise UsageError(
            f"model {model!r}: {key}={value!r} is not a {kind.__name__}",
            hint=f"default is {key}={default!r}",
        )
    return ok


def resolve_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """All keyword arguments of model ``name``: its defaults updated with ``kwargs``.

    Rejects unknown keywords and values of the wrong type (ints are accepted for float
    keywords and converted). The result holds JSON scalars only; ranges (e.g. a valid
    ResNet depth) are checked when the model is built.

    >>> resolve_kwargs("mlp", depth=2)
    {'width': 64, 'depth': 2}
    """
    spec = _spec(name)
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "none"
        raise UsageError(
            f"model {name!r} has no argument {', '.join(map(repr, unknown))}",
            hint=f"allowed (with defaults): {allowed}",
        )
    return {k: _coerce(name, k, kwargs.get(k, d), d) for k, d in spec.defaults.items()}


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Model ``name`` for samples of shape ``input_shape`` (C, H, W) and ``num_classes`` logits.

    Weights are drawn from torch's global generator: seed it with ``torch.manual_seed``
    for a reproducible model. The model is built on the CPU in float32.
    """
    spec = _spec(name)
    resolved = resolve_kwargs(name, **kwargs)
    shape = check_input_shape(input_shape)
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 2
    ):
        raise UsageError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return spec.builder(input_shape=shape, num_classes=int(num_classes), **resolved)


# ----------------------------------------------------------------------------------------
# Checks shared by the models (they raise UsageError, as a bad option value is the user's)


def check_input_shape(input_shape: Any, ndim: int | None = None) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints, of length ``ndim`` if given."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise UsageError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1 or (ndim is not None and len(shape) != ndim):
        what = f"{ndim} positive ints (C, H, W)" if ndim else "positive ints"
        raise UsageError(f"input_shape must be {what}, got {input_shape!r}")
    return shape


def check_int(model: str, key: str, value: int, minimum: int) -> None:
    """Refuse ``value`` of the keyword ``key`` of ``model`` below ``minimum`` (a UsageError)."""
    if value < minimum:
        raise UsageError(f"model {model!r}: {key} must be >= {minimum}, got {value}")


# ----------------------------------------------------------------------------------------
# Per-layer fan-ins for the Hessian rank bound


@dataclass(frozen=True)
class LayerInfo:
    """One parameterised layer, seen as ``neurons`` units each with ``fan_in`` inputs.

    - linear: a neuron is an output feature; fan_in = in_features.
    - conv: a neuron is an output channel (its weights are shared over positions);
      fan_in = in_channels / groups * kernel height * kernel width.
    - batchnorm: a neuron is a channel, which scales its one input (fan_in = 1) and adds
      a shift (its bias); running statistics are buffers, not parameters.

    ``fan_in`` excludes the bias: the caller adds 1 where ``has_bias``, and then
    ``params == neurons * (fan_in + has_bias)``. Residual additions, pooling, ReLU and
    dropout have no parameters and do not appear.
    """

    name: str
    kind: str
    fan_in: int
    neurons: int
    has_bias: bool
    params: int


def _layer_info(name: str, module: nn.Module) -> LayerInfo | None:
    own = list(module.parameters(recurse=False))
    if not own:  # containers, activations, pooling, affine-free BatchNorm
        return None
    params = sum(p.numel() for p in own)
    if isinstance(module, nn.Linear):
        kind, fan_in, neurons = "linear", module.in_features, module.out_features
    elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        kind, neurons = "conv", module.out_channels
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        kind, fan_in, neurons = "batchnorm", 1, module.num_features
    else:
        raise FlatcliError(
            f"cannot count the fan-in of layer {name!r} ({type(module).__name__})",
            hint="the rank bound supports Linear, Conv and BatchNorm layers",
        )
    return LayerInfo(name, kind, fan_in, neurons, module.bias is not None, params)


def layer_fan_ins(model: nn.Module) -> list[LayerInfo]:
    """The layers of ``model`` that own parameters, in module order.

    Raises FlatcliError for a layer type whose fan-in is not defined here, so that a
    rank bound is never silently computed over part of a model.

    >>> [(i.kind, i.fan_in, i.neurons) for i in layer_fan_ins(nn.Linear(4, 3))]
    [('linear', 4, 3)]
    """
    infos = (_layer_info(name, m) for name, m in model.named_modules())
    return [info for info in infos if info is not None]
