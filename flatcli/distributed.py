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
instead of hanging, and the command exits with one line. The timeout is
``$FLATCLI_DIST_TIMEOUT`` seconds (default 300); gloo notices a peer that exited at once.

Test hook (documented so that nobody mistakes it for a feature): ``FLATCLI_TEST_FAIL=
RANK:PASSES:HOW`` makes process RANK, on reaching its all-reduce number PASSES (one per
data pass), either ``exit`` (``os._exit(3)``, as a killed process) or ``raise`` a
:class:`~flatcli.errors.FlatcliError`. Used by tests/test_distributed.py.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from flatcli.errors import FlatcliError, UsageError, first_line

T = TypeVar("T")

#: How long a collective may wait for the other ranks before the run is abandoned.
DEFAULT_TIMEOUT_S = 300.0
#: Environment variable that overrides :data:`DEFAULT_TIMEOUT_S` (seconds).
TIMEOUT_ENV = "FLATCLI_DIST_TIMEOUT"


def configured_timeout() -> float:
    """The collective timeout: ``$FLATCLI_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


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

    def data_shard(self, n: int, batch_size: int | None = None) -> slice:
        """The samples this rank measures of ``n``: whole batches of ``batch_size``, contiguous.

        With ``batch_size`` the shard boundaries fall on the one-process batch boundaries
        (batch b = samples [bB, (b+1)B)), so that a loss normalised per batch (BatchNorm
        on batch statistics) is the same function of the weights under any number of
        processes. With fewer samples (batches) than processes every rank takes all of
        them: each weights its sums by the global count (``size * n``), so the all-reduced
        mean is still the one-process mean, only without a speed-up.
        """
        if self.size == 1:
            return slice(0, n)
        if batch_size is None or batch_size >= n:
            units, unit = n, 1
        else:
            units, unit = -(-n // batch_size), batch_size
        if units < self.size:
            return slice(0, n)
        part = World(self.rank, self.size, self.local_rank).shard(units)
        return slice(part.start * unit, min(part.stop * unit, n))


def world() -> World:
    """The world of this process: from torch.distributed when initialised, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def launched() -> bool:
    """True under ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def active() -> bool:
    """True when this process belongs to an initialised group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0 of an initialised group, or a process on its own (never joined): the one that writes."""
    return not active() or dist.get_rank() == 0


def my_shard(n: int, batch_size: int | None = None) -> slice:
    """This process's samples of ``n`` (:meth:`World.data_shard`) when it is in an initialised
    group of several, else all ``n``: launched by torchrun but never joined, a process
    measures everything, since nothing would add up the shards.
    """
    return world().data_shard(n, batch_size) if active() else slice(0, n)


def init(device: str = "auto", timeout_s: float | None = None) -> World:
    """Join the process group when launched by ``torchrun`` (no-op otherwise); returns the world.

    ``device``: ``auto``/``cuda`` pin this process to ``cuda:LOCAL_RANK`` when CUDA is
    available and join with NCCL for CUDA tensors and gloo for CPU tensors (so a run
    stored as ``--device cpu`` can still be resumed there); otherwise gloo alone. ``timeout_s``: default :func:`configured_timeout`.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return world()
    if timeout_s is None:
        timeout_s = configured_timeout()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as exc:
        text = first_line(exc)
        raise DistributedError(f"cannot join the torchrun process group: {text}") from None
    return world()


def device_for(name: str) -> str:
    """The device string of this rank: ``cuda:LOCAL_RANK`` for auto/cuda under torchrun with CUDA."""
    if launched() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world().local_rank}"
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; any other device must exist here.

    A device is tried by allocating an empty tensor on it, which is what fails later
    (``mps`` on Linux, ``cuda:3`` on a one-GPU machine) if it is not checked now.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA device is available", hint="use --device cpu"
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu or cuda") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        text = first_line(exc)
        why = f" ({text})" if len(text) <= 80 else ""  # torch's dispatcher message runs to a page
        raise UsageError(
            f"--device {name} is not available on this machine{why}", hint="use auto, cpu or cuda"
        ) from None
    return device


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (no-op with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    _test_fault()
    try:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistBackendError) as exc:  # a peer died or timed out
        raise _peer_failed(exc) from None


def _peer_failed(exc: BaseException) -> DistributedError:
    """One line from a backend's error: its first sentence, without gloo's ``[file.cc:line]``."""
    text = first_line(exc)
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text).split(". ")[0]
    return DistributedError(
        f"another process of this run failed or timed out ({text[:120]})",
        hint=f"see the other processes' errors; the timeout is ${TIMEOUT_ENV} seconds",
    )


def _collective_device() -> torch.device:
    """Where small tensors for a collective live: the CPU when gloo serves it, else this rank's GPU."""
    if "gloo" not in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_count(n: int) -> int:
    """The sum of ``n`` over the ranks (``n`` with one process): e.g. the global sample count."""
    if not active():
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_collective_device())
    all_reduce_sum([t])
    return int(t.item())


def all_agree(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a decision all ranks must take together)."""
    if not active():
        return bool(flag)
    return global_count(0 if flag else 1) == 0


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable; ``obj`` itself with one process).

    Every rank passes a value of the same type (ranks other than 0 typically None, and
    ``T`` an optional type); the value passed on ranks other than 0 is discarded.

    For decisions that read something outside the process group (a cache file another
    process may be writing): taken once on rank 0, so that all ranks run the same
    collectives afterwards.
    """
    if not active():
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0, device=_collective_device())
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _peer_failed(exc) from None
    return box[0]


def broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place (no-op with one process).

    E.g. BatchNorm running statistics, which each rank of a data-parallel run updates
    from its own part of the batch: after the broadcast all ranks evaluate one model.
    """
    if not active():
        return
    try:
        for t in tensors:
            dist.broadcast(t, src=0)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _peer_failed(exc) from None


_passes = 0


def _test_fault() -> None:
    """The ``FLATCLI_TEST_FAIL=RANK:PASSES:HOW`` hook of the module docstring (tests only)."""
    global _passes
    spec = os.environ.get("FLATCLI_TEST_FAIL")
    if not spec:
        return
    rank, after, how = spec.split(":")
    _passes += 1
    if int(rank) == dist.get_rank() and _passes >= int(after):
        if how == "exit":
            os._exit(3)
        raise FlatcliError(
            f"test fault on rank {rank} after {after} all-reduces (FLATCLI_TEST_FAIL)"
        )


def finish(wait: bool = False) -> None:
    """Leave the process group, if any (never raises: it runs on the way out of errors too).

    ``wait``: first wait (a barrier, bounded by the timeout) until every process is done,
    so that none closes its connections while another still reads from them: a gloo
    connection closed under a process that is still working can abort it at exit
    ("terminate called without an active exception"). Not after a failure, where a peer
    may be gone.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if wait and dist.get_world_size() > 1:
                dist.barrier()
        except Exception:  # a peer failed after its last collective: leave anyway
            pass
        try:
            dist.destroy_process_group()
        except Exception:  # a group whose peers died: nothing left to leave
            pass


# --- rank 0 decides ----------------------------------------------------------------------
# What reads or writes outside the process group (a run folder, a download) is done by rank
# 0 alone; every rank then receives its value, or its error, so that all take the same path.


def from_main(word: T | None) -> T:
    """Rank 0's ``word`` on every rank; an exception from rank 0 is raised on every rank.

    Every rank calls this together: rank 0 with its word, the others with None (their
    value is discarded). A :class:`~flatcli.errors.FlatcliError` is re-created with its
    class, message and hint, so that every rank ends with rank 0's one line and exit
    code; anything else says that process 0 failed. One process: returns ``word``.
    """
    message: object = word
    if isinstance(word, BaseException):
        if isinstance(word, FlatcliError):
            message = ("error", type(word), word.message, word.hint)
        else:
            message = (
                "error",
                DistributedError,
                f"process 0 of this run failed ({first_line(word)})",
                None,
            )
    received = broadcast_object(message)
    if isinstance(received, tuple) and received[:1] == ("error",):
        _, cls, text, hint = received
        exc = cls.__new__(cls)
        FlatcliError.__init__(exc, text, hint)
        raise exc
    return received  # type: ignore[return-value]  # rank 0's word: a T by the caller's contract


def on_main(action: Callable[[], T]) -> T:
    """``action()`` on rank 0; an error it raises is first sent to the other ranks, then raised here."""
    try:
        return action()
    except BaseException as exc:
        with contextlib.suppress(DistributedError):
            from_main(exc)
        raise


def main_decides(action: Callable[[], T]) -> T:
    """``action()`` on rank 0 alone; its value, or its error, on every rank (one process: ``action()``).

    For what reads the run folder (e.g. a run's stored options for ``--resume``), which
    only rank 0 may be able to see.
    """
    if not active():
        return action()
    if world().is_main:
        return from_main(on_main(action))
    received: T = from_main(None)
    return received


def main_first(current: World, action: Callable[[], T]) -> T:
    """``action()`` on rank 0, then (if it succeeded) on the other ranks: e.g. a download."""
    if current.is_main:
        value = on_main(action)
        from_main("done")
        return value
    from_main(None)
    return action()
