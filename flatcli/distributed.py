"""Data-parallel processes under ``torchrun``: who am I, and how do the shards add up.

``torchrun --nproc-per-node N`` starts N copies of a command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` set. Every copy runs
the same code on its own shard of the data; a quantity that is a mean over samples,

    L = (1/N) sum_i l_i = sum_r (1/N) sum_{i in shard r} l_i,

is the sum over ranks of the shard sums weighted by the GLOBAL N, so one ``all_reduce``
(sum) per data pass makes every rank hold the one-process value (up to the order of
floating-point additions). Estimators then run identically on every rank (same seeds),
and rank 0 alone prints and writes files.

Backends: NCCL on CUDA (each process on device ``LOCAL_RANK``), gloo on the CPU. A
collective that waits longer than ``timeout`` (a rank that died) raises on the others
instead of hanging, and the command exits with one line.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import FlatcliError

#: How long a collective may wait for the other ranks before the run is abandoned.
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(FlatcliError):
    """Another rank failed or could not be reached."""


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (1 process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` samples: sizes differ by at most one.

        Contiguous shards keep a fixed order, so batch statistics and the sums are
        independent of the number of processes up to floating-point rounding.
        """
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def world() -> World:
    """The world of this process: from torch.distributed when initialised, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """True under ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group when launched by ``torchrun`` (no-op otherwise); returns the world.

    ``device``: ``auto``/``cuda`` use NCCL and pin this process to ``cuda:LOCAL_RANK``
    when CUDA is available; otherwise gloo.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(f"cannot join the torchrun process group: {text}") from None
    return world()


def device_for(name: str) -> str:
    """The device string of this rank: ``cuda:LOCAL_RANK`` for auto/cuda under torchrun with CUDA."""
    if launched() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world().local_rank}"
    return name


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (no-op with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    try:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistBackendError) as exc:  # a peer died or timed out
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(f"another process of this run failed or timed out ({text[:120]})") from None


def finish() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
