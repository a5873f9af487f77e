"""Random probe vectors, drawn on the operator's device and dtype from a seeded generator.

Estimators never pick a device or dtype themselves: every random vector comes from here,
shaped (P, n) and placed where ``op.params`` lives, so that the same seed gives the same
probes for the same operator.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class LinearOperatorLike(Protocol):
    """What the estimators need of an operator (``CurvatureOperator`` provides it)."""

    num_params: int
    device: torch.device
    dtype: torch.dtype
    hvps: int

    def matmat(self, V: Tensor) -> Tensor: ...

    def matvec(self, v: Tensor) -> Tensor: ...


def generator(op: LinearOperatorLike, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on the operator's device, seeded with ``seed``."""
    return torch.Generator(device=op.device).manual_seed(int(seed))


def gaussian(op: LinearOperatorLike, n: int, gen: torch.Generator) -> Tensor:
    """(P, n) standard normal entries."""
    return torch.randn(op.num_params, n, generator=gen, device=op.device, dtype=op.dtype)


def rademacher(op: LinearOperatorLike, n: int, gen: torch.Generator) -> Tensor:
    """(P, n) independent +-1 entries."""
    bits = torch.randint(0, 2, (op.num_params, n), generator=gen, device=op.device)
    return bits.to(op.dtype).mul_(2).sub_(1)
