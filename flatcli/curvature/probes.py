"""Random probe vectors, in the operator's dtype on its device, from a seeded generator.

Estimators never pick a device or dtype themselves: every random vector comes from here,
shaped (P, n) and placed where ``op.params`` lives, so that the same seed gives the same
probes for the same operator. They are drawn on the CPU and then moved: a CUDA generator's
stream depends on the GPU's launch configuration (e.g. its number of multiprocessors), and
the processes of a torchrun must draw identical vectors, on any mix of devices, for their
all-reduced products to be products of one matrix with one vector (a P x n draw costs
little next to n Hessian-vector products). The same seed gives the same probes on the
CPU and on CUDA.
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

    def matmat(self, V: Tensor) -> Tensor:
        """H V for a block V (P, K)."""
        ...

    def matvec(self, v: Tensor) -> Tensor:
        """H v for a vector v (P,)."""
        ...


def generator(op: LinearOperatorLike, seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (for any operator device: see above)."""
    return torch.Generator().manual_seed(int(seed))


def gaussian(op: LinearOperatorLike, n: int, gen: torch.Generator) -> Tensor:
    """(P, n) standard normal entries."""
    return torch.randn(op.num_params, n, generator=gen, dtype=op.dtype).to(op.device)


def rademacher(op: LinearOperatorLike, n: int, gen: torch.Generator) -> Tensor:
    """(P, n) independent +-1 entries."""
    bits = torch.randint(0, 2, (op.num_params, n), generator=gen)
    return bits.to(device=op.device, dtype=op.dtype).mul_(2).sub_(1)
