"""Refusing weights with NaN or Inf entries: their curvature is undefined, and an
eigensolver fed such products fails with an error that names neither the cause nor the
tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from flatcli.errors import NonFiniteError, few


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers holding a NaN or an Inf."""
    return [
        name
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())
    ]


def require_finite_weights(model: nn.Module, where: str = "the model") -> None:
    """Raise :class:`~flatcli.errors.NonFiniteError` naming the tensors with NaN/Inf values."""
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteError(
            f"{where} has non-finite weights (NaN or Inf) in {few(bad)}: its curvature is undefined"
        )
