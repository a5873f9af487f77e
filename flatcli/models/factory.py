"""The user's own model: a factory that builds it, and the logits out of whatever it returns.

A checkpoint without flatcli metadata holds weights but not the architecture; a
*factory* builds the ``nn.Module`` the weights are loaded into. It is named by a spec,

- ``package.module:function`` (importable, e.g. ``torchvision.models:resnet18``, or a
  module in the working folder), or
- ``path/to/file.py:function`` (the file is executed as a module; its folder is on
  ``sys.path`` while it is imported, so it may import its neighbours),

where ``function`` may be dotted (``module:Class.build``) and is called with the keyword
arguments ``factory_args`` (``--factory-arg KEY=VALUE``). Or, from Python, any callable.

The curvature engine differentiates ``cross_entropy(f(x), y)`` and needs ``f(x)`` to be
one ``(batch, classes)`` logits tensor. Models from elsewhere often return more:
a dict, a tuple, or an object such as Hugging Face's ``ModelOutput``. :class:`LogitsOf`
wraps such a model and picks the logits by :func:`pick_logits`'s rule.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from flatcli.errors import CheckpointError, UsageError, few, first_line

#: A user's model factory: a spec ``"MODULE:FUNCTION"`` / ``"FILE.py:FUNCTION"``, or a callable.
ModelFactory = str | Callable[..., nn.Module]


def import_factory(
    spec: str, factory_args: Mapping[str, Any] | None = None
) -> Callable[[], nn.Module]:
    """``MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` -> a zero-argument builder of the ``nn.Module``.

    The module is imported now (an import error is one :class:`CheckpointError`); the
    function is called by the builder, with ``factory_args`` as keyword arguments.
    """
    if not isinstance(spec, str) or ":" not in spec or not all(spec.rsplit(":", 1)):
        raise UsageError(
            f"--model-factory {spec!r} is not MODULE:FUNCTION or FILE.py:FUNCTION",
            hint="e.g. torchvision.models:resnet18 or mymodels.py:build",
        )
    module_name, func_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            module = _import_file(Path(module_name))
        else:
            module = _import_module(module_name)
    except CheckpointError:
        raise
    except Exception as exc:  # any import failure of user code is the user's to fix
        raise CheckpointError(
            f"--model-factory: cannot import {module_name} ({type(exc).__name__}: "
            f"{first_line(exc)})"
        ) from None
    func: Any = module
    for part in func_name.split("."):
        func = getattr(func, part, None)
    if not callable(func):
        raise CheckpointError(f"--model-factory: {module_name} has no function {func_name}")
    return checked_factory(func, factory_args, name=spec)


def _import_module(name: str) -> ModuleType:
    """``importlib.import_module``, with the working folder last on ``sys.path`` meanwhile:
    a console script's ``sys.path`` lacks it, and ``mymodels:build`` means ./mymodels.py
    there as it does for ``python -m``; installed modules come first.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise CheckpointError(f"--model-factory: no file {path}")
    loader_spec = importlib.util.spec_from_file_location(path.stem, path)
    if loader_spec is None or loader_spec.loader is None:
        raise CheckpointError(f"--model-factory: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        loader_spec.loader.exec_module(module)
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:  # the module removed it itself
            pass
    return module


def checked_factory(
    func: Callable[..., Any],
    factory_args: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
) -> Callable[[], nn.Module]:
    """A zero-argument builder calling ``func(**factory_args)``: whatever it raises, or a
    result that is not an ``nn.Module``, becomes one :class:`CheckpointError`.
    """
    kwargs = dict(factory_args or {})
    label = name or getattr(func, "__qualname__", None) or repr(func)

    def build() -> nn.Module:
        try:
            model = func(**kwargs)
        except Exception as exc:
            args = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
            raise CheckpointError(
                f"the model factory {label}{args} failed: {type(exc).__name__}: {first_line(exc)}"
            ) from None
        if not isinstance(model, nn.Module):
            raise CheckpointError(
                f"the model factory {label} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    return build


def resolve_factory(
    model_factory: ModelFactory | None, factory_args: Mapping[str, Any] | None = None
) -> Callable[[], nn.Module] | None:
    """``model_factory`` (a spec string, a callable or None) with its arguments -> a builder or None."""
    if factory_args is not None and not isinstance(factory_args, Mapping):
        raise UsageError(
            f"factory_args must be a dict of keyword arguments, not {type(factory_args).__name__}"
        )
    if model_factory is None:
        if factory_args:
            raise UsageError("--factory-arg needs --model-factory")
        return None
    if isinstance(model_factory, str):
        return import_factory(model_factory, factory_args)
    if not callable(model_factory):
        raise UsageError(
            f"model_factory must be MODULE:FUNCTION or a callable, not {type(model_factory).__name__}"
        )
    return checked_factory(model_factory, factory_args)


# --- logits out of whatever the forward returns -------------------------------------------


def pick_logits(out: Any, output: str | int | None = None) -> torch.Tensor:
    """The logits in a model's output ``out``.

    With ``output`` (``--output KEY``): ``out[KEY]`` for a dict (a Hugging Face
    ``ModelOutput`` is one), ``out[int(KEY)]`` for a tuple or list, else the attribute
    ``out.KEY``. Without it, the first rule that applies:

    1. a tensor is the logits;
    2. a dict with a ``"logits"`` key, or an object (a named tuple included) with a
       ``logits`` attribute: that;
    3. a dict with exactly one tensor value: that;
    4. a tuple or list whose first element is a 2-D tensor: that (the convention of
       ``return_dict=False`` models and of torchvision's auxiliary-head outputs).

    Anything else is one :class:`CheckpointError` naming what the forward returned and
    suggesting ``--output``; an ``output`` that is not in ``out`` is a
    :class:`UsageError`. The result must be a tensor.
    """
    if output is not None:
        picked = _by_key(out, output)
        if not isinstance(picked, torch.Tensor):
            raise UsageError(
                f"--output {output} picks a {describe_output(picked)} out of the model's "
                f"{describe_output(out)}, not a tensor of logits"
            )
        return picked
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        named = out.get("logits")
        if isinstance(named, torch.Tensor):
            return named
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    elif isinstance(attribute := getattr(out, "logits", None), torch.Tensor):
        return attribute
    if (
        isinstance(out, (tuple, list))
        and out
        and isinstance(out[0], torch.Tensor)
        and out[0].ndim == 2
    ):
        return out[0]
    raise CheckpointError(
        f"the model returned a {describe_output(out)}, and flatcli cannot tell which part "
        "is the logits",
        hint="pass --output KEY (a dict key, attribute name or tuple index; Python: output=...)",
    )


def _by_key(out: Any, key: str | int) -> Any:
    text = str(key)
    if isinstance(out, Mapping):
        if text in out:
            return out[text]
        if text.lstrip("-").isdigit() and int(text) in out:
            return out[int(text)]
        raise UsageError(
            f"--output {text}: the model returned a {describe_output(out)} without the key {text!r}"
        )
    if isinstance(out, (tuple, list)) and text.lstrip("-").isdigit():
        if not -len(out) <= int(text) < len(out):
            raise UsageError(
                f"--output {text}: the model returned a {describe_output(out)}, "
                f"indices 0 to {len(out) - 1}"
            )
        return out[int(text)]
    if not text.isidentifier() or not hasattr(out, text):
        raise UsageError(
            f"--output {text}: the model returned a {describe_output(out)}, which has no {text!r}"
        )
    return getattr(out, text)


def describe_output(out: Any, depth: int = 0) -> str:
    """A short description of a forward's result: ``tensor 4x10``, ``dict with keys 'a', 'b'``, ..."""
    if isinstance(out, torch.Tensor):
        return "tensor " + ("x".join(map(str, out.shape)) if out.ndim else "(a scalar)")
    name = type(out).__name__
    if isinstance(out, Mapping):
        keys = list(out.keys())
        shown = few([repr(k) for k in keys], 6)
        return f"{name} with keys {shown}" if keys else f"empty {name}"
    if isinstance(out, (tuple, list)):
        if depth or not out:
            return f"{name} of {len(out)}"
        items = ", ".join(describe_output(v, 1) for v in out[:4]) + (
            ", ..." if len(out) > 4 else ""
        )
        return f"{name} of {len(out)} ({items})"
    fields = (
        [k for k, v in vars(out).items() if not k.startswith("_")]
        if hasattr(out, "__dict__")
        else []
    )
    return f"{name} with attributes {', '.join(fields[:6])}" if fields else name


class LogitsOf(nn.Module):
    """``model`` whose forward returns the logits picked out of ``model``'s result by
    :func:`pick_logits` (``output`` as ``--output``).

    The wrapper shares ``model``'s parameters, buffers and submodules (the very same
    dicts), so that its ``named_parameters()``, ``state_dict()`` and per-layer names are
    the user's own (``fc.weight``, not ``model.fc.weight``) and
    ``torch.func.functional_call`` with those names reaches ``model``. The weights are
    loaded into ``model`` before it is wrapped. ``train``/``eval`` set ``model``'s own
    ``training`` flag too (a forward may read it, e.g. to return auxiliary logits).
    """

    _inner: nn.Module  # set with object.__setattr__: not a registered submodule

    def __init__(self, model: nn.Module, output: str | int | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", model)  # not a submodule: its names would gain a prefix
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self.output = output
        self.training = model.training

    @property
    def wrapped(self) -> nn.Module:
        """The user's model."""
        return self._inner

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The logits of ``model(*args, **kwargs)``."""
        return pick_logits(self._inner(*args, **kwargs), self.output)

    def train(self, mode: bool = True) -> LogitsOf:
        """Set the wrapper's and ``model``'s ``training`` flags (and the submodules')."""
        super().train(mode)
        self._inner.training = mode
        return self

    def extra_repr(self) -> str:
        """What is wrapped, and which output is picked."""
        return f"wrapping {type(self._inner).__name__}, output={self.output!r}"
