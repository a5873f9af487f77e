"""The Hessian (or Gauss-Newton matrix) of the training loss as a linear operator.

For a classifier f(x; w) with logits z_i = f(x_i; w), probabilities p_i = softmax(z_i)
and the mean cross-entropy L(w) = (1/N) sum_i -log p_{i, y_i}, the operator applies

    Hessian:  H = (1/N) sum_i [ J_i^T (diag p_i - p_i p_i^T) J_i
                                + sum_c (p_ic - [c = y_i]) d^2 z_ic / dw^2 ]
    GGN:      G = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i,      J_i = dz_i/dw,

plus ``l2 * I`` when asked (the Hessian of the coupled regulariser (l2/2) ||w||^2), to a
block of K vectors V (P x K) in ONE pass over the data (Granziol 2020, "Flatness is a
False Friend", measures H of the loss without the regulariser).

Hessian-vector products use torch.func (Pearlmutter 1994, "Fast exact multiplication by
the Hessian"):

* double backward (reverse-over-reverse): ``_, vjp_fn = vjp(grad(L), w)`` once per batch,
  then ``vmap(vjp_fn)`` over the K vectors (H is symmetric, so v^T H = (H v)^T);
* forward-over-reverse: ``vmap(v -> jvp(grad(L), (w,), (v,))[1])``;
* GGN: ``J v`` by jvp of the logits, multiply by ``diag p - p p^T``, then ``J^T`` by vjp.

``method="auto"`` picks double backward on every device (``AUTO_METHOD``): it builds the
gradient graph once per batch and reuses it for every chunk of vectors, where
forward-over-reverse recomputes it per chunk; reverse mode has the wider operator
coverage in torch (forward-mode AD still misses or mis-derives some ops, e.g.
pytorch/pytorch#196699, nested forward mode through batch_norm); and on the CPU it is
faster for the single products Lanczos needs and ties on blocks (measured with
``bench/hvp_methods.py``, results in bench/README.md).

Model state: dropout and every other train/eval switch is in eval mode. BatchNorm uses
its running statistics (``bn_mode="eval"``, as PyHessian does), the statistics of each
batch (``bn_mode="batch"``, as the paper's authors did), or those of the whole measured
set (``bn_mode="full"``), the latter two through
``torch.func.replace_all_batch_norm_modules_`` on a structural copy of the model.
With batch statistics the loss is L(w) = sum_b (n_b / N) L_b(w), each batch b normalised
by its own mean and variance, so the matrix depends on how the data is cut into batches:
``"batch"`` cuts it into batches of ``batch_size`` (the caller's choice, never a memory
heuristic's: :func:`memory_bounded` refuses rather than shrinking it), ``"full"`` takes
all N samples as one batch, which is the Hessian of the loss with whole-set statistics.
The user's model is never mutated: the copy shares no state that we write, parameters
and buffers are passed to ``torch.func.functional_call`` explicitly, and running
statistics are never updated.

Data: tensors in memory, cut into batches of ``batch_size``, or a stream (a DataLoader,
any re-iterable of ``(x, y)`` batches) read once per data pass in its own batches and
checked to be the same on every pass (:mod:`flatcli.curvature.batches`): the matrix must
be one fixed matrix for Lanczos and Hutch++. Kept gradient graphs (``cache_graph``) are
indexed by batch position, which that check makes safe for a stream too.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, vjp, vmap

from flatcli.curvature.batches import DataSource, StreamedData, TensorData, as_source
from flatcli.distributed import active as distributed_active
from flatcli.distributed import all_reduce_sum, global_count
from flatcli.errors import TooLargeError, UnknownNameError, UsageError

if TYPE_CHECKING:  # scipy is optional (a test/benchmark dependency)
    import scipy.sparse.linalg


class Curvature(str, enum.Enum):
    """Which curvature matrix the operator applies."""

    HESSIAN = "hessian"
    GGN = "ggn"


class BatchNormMode(str, enum.Enum):
    """Which statistics BatchNorm layers normalise with."""

    EVAL = "eval"  # running statistics
    BATCH = "batch"  # statistics of the current batch (the batch size defines the matrix)
    FULL = "full"  # statistics of the whole measured set: one batch of all N samples


class HvpMethod(str, enum.Enum):
    """How a Hessian-vector product is computed."""

    AUTO = "auto"
    DOUBLE_BACKWARD = "double_backward"
    FORWARD_OVER_REVERSE = "forward_over_reverse"


#: The vjp function of one batch's gradient: v -> (v^T H_b,).
_VjpFn = Callable[[Tensor], tuple[Tensor, ...]]
#: One batch's block product, (operator, x, y, V^T) -> (H_b V)^T (rows are vectors).
_BlockProduct = Callable[["CurvatureOperator", Tensor, Tensor, Tensor], Tensor]


# ``method="auto"`` resolves through this table (see the module docstring for the reasons);
# device types missing from it use the "cpu" entry.
AUTO_METHOD: dict[str, HvpMethod] = {
    "cpu": HvpMethod.DOUBLE_BACKWARD,
    "cuda": HvpMethod.DOUBLE_BACKWARD,
}


_E = TypeVar("_E", bound=enum.Enum)


def parse_enum(enum_cls: type[_E], value: object, option: str) -> _E:
    """The member of ``enum_cls`` with this value, or an
    :class:`~flatcli.errors.UnknownNameError` naming ``option`` and the choices.
    """
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise UnknownNameError(f"unknown {option} {value!r}", f"choose one of {choices}") from None


def _data_pass(
    batch_fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]],
    source: DataSource,
    *,
    batch_size: int | None,
    device: torch.device,
    dtype: torch.dtype,
    num_samples: int | None = None,
) -> tuple[Tensor, ...]:
    """One pass over the data: ``sum_b (n_b / N) * batch_fn(X_b, y_b)``.

    ``batch_fn`` returns per-batch *means* (of a loss, a gradient, a block of HVPs ...);
    weighting each by its share ``n_b / N`` of the samples makes the sum exactly the
    mean over all N samples, also when N is not a multiple of ``batch_size`` (the last,
    shorter batch gets a smaller weight). Floating-point inputs are cast to ``dtype``;
    every batch is moved to ``device`` just before use. ``source``: see
    :mod:`flatcli.curvature.batches`.

    Data parallel (torchrun): the data here is this process's shard and ``num_samples``
    the GLOBAL N; the shard sums are added over the processes (all_reduce), so every
    process gets the mean over all N samples, sum_r sum_{b in shard r} (n_b / N) f_b.
    """
    n_local = source.num_samples
    n_total = n_local if num_samples is None else num_samples
    totals: list[Tensor] | None = None
    # tensors in slices of batch_size; a stream (DataLoader) in its own batches, read once
    for x, y in source.batches(batch_size):
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else None, non_blocking=True)
        y = y.to(device=device, non_blocking=True)
        weight = x.shape[0] / n_total
        # torch.func transforms ignore an outer no_grad; it only stops ordinary autograd
        # from recording (batch-statistics BatchNorm's double backward otherwise returns
        # tensors that require grad and keep a graph alive).
        with torch.no_grad():
            outs = batch_fn(x, y)
        if totals is None:
            totals = [out * weight for out in outs]
        else:
            for total, out in zip(totals, outs, strict=True):
                total.add_(out, alpha=weight)
    assert totals is not None
    all_reduce_sum(totals)  # the shard sums of every process (no-op with one process)
    return tuple(totals)


def _map_rows(fn: Callable[[Tensor], Tensor], vs: Tensor, chunk_size: int | None) -> Tensor:
    """``fn`` applied to each row of ``vs`` (K, P): vmapped, ``chunk_size`` rows per call;
    ``chunk_size=1`` loops over the rows instead (the batch's gradient graph is still
    built once and shared by all of them).

    A single row is passed straight to ``fn``: vmap's batching rules cost time (measured
    in bench/README.md) and gain nothing for one vector.
    """
    if vs.shape[0] == 1:
        return fn(vs[0]).unsqueeze(0)
    if chunk_size == 1:
        return torch.stack([fn(v) for v in vs])
    return vmap(fn, chunk_size=chunk_size)(vs)


def _num_samples(inputs: Tensor | DataSource) -> int:
    return inputs.num_samples if isinstance(inputs, DataSource) else inputs.shape[0]


def activation_bytes_per_sample(model: nn.Module, inputs: Tensor | DataSource) -> int:
    """Bytes of all leaf modules' outputs for one input (one forward pass, eval mode)."""
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: sizes.append(out.numel() * out.element_size())
        )
        for m in model.modules()
        if not list(m.children())
    ]
    flags = [(m, m.training) for m in model.modules()]  # each module's own flag, restored
    example = inputs.example if isinstance(inputs, DataSource) else inputs[:1]
    try:
        model.eval()
        with torch.no_grad():
            first = next(model.parameters())
            model(
                example.to(
                    device=first.device, dtype=first.dtype if example.is_floating_point() else None
                )
            )
    finally:
        for m, flag in flags:
            m.training = flag
        for h in hooks:
            h.remove()
    return max(sum(sizes), 1)


def suggest_chunk_size(
    model: nn.Module,
    inputs: Tensor | DataSource,
    batch_size: int,
    *,
    budget_bytes: int = 2 * 2**30,
    overhead: float = 2.0,
    per_sample: int | None = None,
) -> int:
    """How many vectors one vmapped call may carry within ``budget_bytes``.

    A vmapped Hessian-vector product keeps, per vector, about the activations of one
    batch over (forward, backward and their tangents). The activations per sample are
    measured with one forward pass of a single input (the sizes of every leaf module's
    output); ``overhead`` covers the extra copies, with room to spare (the peak memory
    measured in bench/README.md).
    """
    if per_sample is None:
        per_sample = activation_bytes_per_sample(model, inputs)
    per_vector = overhead * batch_size * per_sample
    return max(1, int(budget_bytes // per_vector))


#: The batch size when none is given, except on the CPU (see :func:`auto_batch_size`);
#: with ``bn_mode="batch"`` the batch that defines the matrix, on every device.
DEFAULT_BATCH = 1024
#: Memory of one vector's product per byte of a batch's activations (suggest_chunk_size).
SAFETY = 2.0
#: On the CPU, automatic batches keep one batch's activations within this many bytes ...
CPU_BATCH_BYTES = 8 * 2**20
#: ... but take at least this many samples.
MIN_AUTO_BATCH = 32


def auto_batch_size(
    model: nn.Module, inputs: Tensor | DataSource, per_sample: int | None = None
) -> int:
    """Samples per forward pass when the user gives none (capped at N).

    On the CPU: as many as keep the batch's activations (all leaf modules' outputs)
    within ``CPU_BATCH_BYTES``, between ``MIN_AUTO_BATCH`` and ``DEFAULT_BATCH``.
    Larger tensors come from fresh pages of memory on every allocation (glibc serves
    blocks over ~32 MB by mmap), and the page faults then cost more than the arithmetic
    (measured in bench/README.md). Elsewhere: ``DEFAULT_BATCH``. ``per_sample``:
    :func:`activation_bytes_per_sample`, if known.
    """
    n = _num_samples(inputs)
    if next(model.parameters()).device.type != "cpu":
        return min(DEFAULT_BATCH, n)
    if per_sample is None:
        per_sample = activation_bytes_per_sample(model, inputs)
    fits = CPU_BATCH_BYTES // per_sample
    return min(max(MIN_AUTO_BATCH, min(fits, DEFAULT_BATCH)), n)


def memory_bounded(
    model: nn.Module,
    inputs: Tensor | DataSource,
    batch_size: int | None = None,
    *,
    budget_bytes: int = 2 * 2**30,
    bn_mode: str = "eval",
) -> dict[str, Any]:
    """Operator settings that keep a block product within ``budget_bytes``.

    With batch statistics the batch defines the matrix, so memory never sets it:
    ``bn_mode="batch"`` takes ``batch_size`` or :data:`DEFAULT_BATCH`, ``"full"`` all N,
    and a product of one vector over that batch (``SAFETY * batch * activations per
    sample``, as in :func:`suggest_chunk_size`) that exceeds ``budget_bytes`` is refused
    (:class:`~flatcli.errors.TooLargeError`) rather than cut into smaller batches.
    ``inputs`` may be a :class:`~flatcli.curvature.batches.DataSource`: a stream (a
    DataLoader) is cut by the loader, so its batch is the loader's (checked against the
    budget like any batch that defines the matrix) and ``batch_size`` comes back None.
    Otherwise: ``batch_size`` (capped at N; ``None``: :func:`auto_batch_size`), the vmap
    ``chunk_size`` from :func:`suggest_chunk_size`, and ``cache_graph`` when every batch's
    gradient graph fits. On the CPU the chunk is 1, a loop over the vectors: double
    backward (``auto`` on the CPU) builds each batch's graph once for the whole block,
    and vmap's batching brings no speed there, where a model's products already run as
    matrix products at the CPU's speed (measured in bench/README.md).
    Forward-over-reverse recomputes the graph per call, so give that method a larger
    ``chunk_size``.
    """
    n = _num_samples(inputs)
    mode = parse_enum(BatchNormMode, bn_mode, "BatchNorm mode")
    per_sample = activation_bytes_per_sample(model, inputs)  # one forward pass of one input
    streamed = isinstance(inputs, StreamedData) and mode is not BatchNormMode.FULL
    if isinstance(inputs, StreamedData) and streamed:  # the loader's batches are its own
        batch = inputs.batch_size
    elif mode is BatchNormMode.FULL:
        batch = n if batch_size is None else min(batch_size, n)
    elif mode is BatchNormMode.BATCH:
        batch = min(batch_size or DEFAULT_BATCH, n)
    else:
        batch = min(batch_size, n) if batch_size else auto_batch_size(model, inputs, per_sample)
    need = SAFETY * batch * per_sample
    if mode is not BatchNormMode.EVAL and need > budget_bytes:
        raise TooLargeError(
            f"BatchNorm mode {mode.value!r} normalises with the statistics of batches of {batch} samples; "
            f"one Hessian-vector product over such a batch needs about {need / 2**30:.3g} GiB, "
            f"over the memory budget of {budget_bytes / 2**30:.3g} GiB, and smaller batches would "
            "change the matrix being measured",
            "raise the memory budget (--memory-gb), or choose the batch that defines the matrix "
            "yourself (--batch-size, with --bn-mode batch), or use --bn-mode eval",
        )
    chunk = suggest_chunk_size(
        model, inputs, batch, budget_bytes=budget_bytes, per_sample=per_sample
    )
    if next(model.parameters()).device.type == "cpu":
        chunk = 1
    cache = 4 * n * per_sample <= budget_bytes
    return {"batch_size": None if streamed else batch, "chunk_size": chunk, "cache_graph": cache}


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares (does not duplicate) parameters and buffers.

    Its modules' attributes (training flags, BatchNorm settings) can then be changed
    without touching the user's model; the shared tensors are only ever read.
    """
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


class CurvatureOperator:
    """Hessian (or GGN) of the mean cross-entropy over a data set, as a linear operator
    on the flat parameter vector.

    Args:
        model: a classifier returning logits (N, C) (or (N, C, ...) for the Hessian).
            Not modified.
        inputs, targets: the data (N, ...) and integer class labels (N,). They may live
            on any device; batches are moved to the model's device. Or, with
            ``targets`` omitted, ``inputs`` is the data as one object: a pair
            ``(inputs, targets)``, a ``torch.utils.data.DataLoader``, or any
            re-iterable of ``(x, y)`` batches (:mod:`flatcli.curvature.batches`). A
            stream is read batch by batch, once per data pass, in the loader's own
            batches (``batch_size`` must then be unset; with ``bn_mode="batch"`` the
            loader's batches define the matrix, and ``"full"`` concatenates them into
            one batch of N in memory). A stream that shuffles or augments at random is
            refused on construction (it is read twice and compared).
        curvature: ``"hessian"`` or ``"ggn"`` (generalised Gauss-Newton).
        bn_mode: ``"eval"`` (BatchNorm running statistics), ``"batch"`` (batch
            statistics, the loss of each batch normalised with its own statistics) or
            ``"full"`` (statistics of all N samples: one batch of N).
        batch_size: samples per forward pass; ``None`` = all at once. Results are the
            exact full-data mean in ``"eval"`` mode whatever the batch size; in
            ``"batch"`` mode it defines the matrix; ``"full"`` refuses one below N.
        chunk_size: most vectors per vmapped call (bounds memory); ``None`` = all K.
        l2: adds ``l2 * I``.
        param_names: restrict to these parameters (others held fixed): the operator is
            then the corresponding diagonal block. Default: every parameter that
            requires grad, in ``named_parameters()`` order.
        dtype: computation dtype; ``None`` = the parameters' dtype. Parameters, buffers
            and floating-point inputs are cast (the model itself is not).
        method: ``"double_backward"``, ``"forward_over_reverse"`` or ``"auto"`` (the
            table ``AUTO_METHOD`` per device type). The GGN always uses jvp then vjp.
        progress: called with the number of HVPs done so far after each data pass.
        cache_graph: keep each batch's gradient graph (double backward) between passes;
            ``None``: when the data is one batch. Valid for a stream too, whose batches
            are checked to be the same each pass (it is still read, for that check).

    The flat vector concatenates the selected parameters, each flattened row-major, in
    ``param_names`` order. The operator snapshots the selected parameters; do not
    modify the model in place while using it.

    Example:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(100, 4), torch.randint(0, 3, (100,))
        >>> op = CurvatureOperator(model, x, y, batch_size=32, dtype=torch.float64)
        >>> op.num_params, op.param_names
        (67, ('0.weight', '0.bias', '2.weight', '2.bias'))
        >>> hv = op.matmat(torch.randn(67, 5, dtype=torch.float64))  # one pass, 5 HVPs
        >>> hv.shape, op.hvps
        (torch.Size([67, 5]), 5)
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor | Iterable[Any] | DataSource,
        targets: Tensor | None = None,
        *,
        curvature: str = "hessian",
        bn_mode: str = "eval",
        batch_size: int | None = None,
        chunk_size: int | None = None,
        l2: float = 0.0,
        param_names: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        method: str = "auto",
        progress: Callable[[int], None] | None = None,
        cache_graph: bool | None = None,
    ) -> None:
        self.curvature = parse_enum(Curvature, curvature, "curvature")
        self.bn_mode = parse_enum(BatchNormMode, bn_mode, "BatchNorm mode")
        requested_method = parse_enum(HvpMethod, method, "HVP method")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
            if value is not None and value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value}")
        source = as_source(inputs, targets)  # checks shapes, labels and a stream's determinism
        if source.streamed and batch_size is not None:
            raise UsageError(
                f"batch_size {batch_size} does not apply to a DataLoader: its own batches are measured",
                "set the loader's batch_size instead",
            )
        if self.bn_mode is BatchNormMode.FULL and isinstance(source, StreamedData):
            if distributed_active():  # each process would normalise with its own part's statistics
                raise UsageError(
                    "bn_mode 'full' with a DataLoader under torchrun would normalise each process's "
                    "part by its own statistics, not the whole set's",
                    "pass the data as tensors (flatcli then gives every process all of it), "
                    "or measure in one process",
                )
            source = source.gather()  # whole-set statistics: one batch of all N samples

        all_params = dict(model.named_parameters())
        if not all_params:
            raise UsageError("the model has no parameters")
        if param_names is None:
            selected = [n for n, p in all_params.items() if p.requires_grad]
        else:
            selected = list(dict.fromkeys(param_names))
            unknown = [n for n in selected if n not in all_params]
            if unknown:
                raise UsageError(
                    f"unknown parameter name(s): {', '.join(unknown)}",
                    f"the model has {', '.join(all_params)}",
                )
        if not selected:
            raise UsageError("no parameters selected", "pass param_names or unfreeze parameters")

        first = next(iter(all_params.values()))
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype if dtype is None else dtype
        if not self.dtype.is_floating_point:
            raise UsageError(f"dtype must be a floating-point type, got {self.dtype}")

        self._model = _structural_copy(model)
        self._model.eval()  # dropout off; BatchNorm on running statistics
        if (
            self.bn_mode is BatchNormMode.FULL
            and batch_size is not None
            and batch_size < source.num_samples
        ):
            raise UsageError(
                f"bn_mode 'full' normalises with the statistics of all {source.num_samples} samples, "
                f"which takes one batch of them, not batches of {batch_size}",
                "leave batch_size unset, or use bn_mode 'batch' for per-batch statistics",
            )
        if self.bn_mode in (BatchNormMode.BATCH, BatchNormMode.FULL):
            replace_all_batch_norm_modules_(self._model)  # running stats -> None (on the copy)
            for module in self._model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()  # batch statistics; nothing is tracked any more

        def cast(t: Tensor) -> Tensor:
            t = t.detach()
            return t.to(self.dtype) if t.is_floating_point() else t

        self.param_names: tuple[str, ...] = tuple(selected)
        self.param_shapes: tuple[torch.Size, ...] = tuple(all_params[n].shape for n in selected)
        self._numels = [all_params[n].numel() for n in selected]
        self.params: Tensor = torch.cat([cast(all_params[n]).reshape(-1) for n in selected])
        self.num_params: int = self.params.numel()
        # Held fixed: unselected parameters and the (copy's) buffers.
        chosen = set(selected)
        self._fixed: dict[str, Tensor] = {
            n: cast(p) for n, p in all_params.items() if n not in chosen
        }
        self._fixed.update({n: cast(b) for n, b in self._model.named_buffers()})
        # the uncast tensors (shared, not copied), for :meth:`astype`
        self._sources: dict[str, Tensor] = {n: p.detach() for n, p in all_params.items()}
        self._sources.update({n: b.detach() for n, b in self._model.named_buffers()})

        self.method = (
            AUTO_METHOD.get(self.device.type, AUTO_METHOD["cpu"])
            if requested_method is HvpMethod.AUTO
            else requested_method
        )
        # the per-batch block product, by (curvature, method); unbound, so that a copy
        # (astype) applies it to itself
        blocks: dict[tuple[Curvature, HvpMethod], _BlockProduct] = {
            (Curvature.HESSIAN, HvpMethod.DOUBLE_BACKWARD): CurvatureOperator._hvp_double_backward,
            (
                Curvature.HESSIAN,
                HvpMethod.FORWARD_OVER_REVERSE,
            ): CurvatureOperator._hvp_forward_over_reverse,
            (Curvature.GGN, HvpMethod.DOUBLE_BACKWARD): CurvatureOperator._ggn_block,
            (Curvature.GGN, HvpMethod.FORWARD_OVER_REVERSE): CurvatureOperator._ggn_block,
        }
        self._block = blocks[(self.curvature, self.method)]
        # Under torchrun ``inputs`` are this process's shard: the weights n_b / N of a data
        # pass use the GLOBAL N (one all-reduce, here); see :func:`_data_pass`.
        self.local_samples: int = source.num_samples
        self.num_samples: int = global_count(self.local_samples)
        # a stream's batch size is its own (its largest batch), for information only
        self.batch_size: int = (
            source.batch_size
            if isinstance(source, StreamedData)
            else self.local_samples
            if batch_size is None
            else batch_size
        )
        self.chunk_size = chunk_size
        self.l2 = float(l2)
        self.progress = progress
        self.hvps: int = 0
        # Double backward: keep each batch's gradient graph (its vjp function) between
        # products, so that a product costs one backward-of-backward instead of a
        # forward, a backward and that (as PyHessian does with its retained graph).
        # Default: when the data is a single batch; pass True when memory allows more.
        # A stream's graphs stay valid because its batches are checked to be the same
        # every pass (sizes and labels each pass, inputs on construction).
        single_batch = (
            len(source.sizes) == 1
            if isinstance(source, StreamedData)
            else self.batch_size >= self.local_samples
        )
        self._cache: list[_VjpFn] | None = (
            [] if (single_batch if cache_graph is None else cache_graph) else None
        )
        self._batch_index = 0
        #: the data (:mod:`flatcli.curvature.batches`); ``_inputs``/``_targets`` the
        #: tensors when they are in memory, None for a stream
        self.source: DataSource = source
        self._inputs = source.inputs if isinstance(source, TensorData) else None
        self._targets = source.targets if isinstance(source, TensorData) else None

    # ----------------------------------------------------------------- flat vectors

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``, as for a matrix."""
        return (self.num_params, self.num_params)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (P,) into ``{name: tensor of the parameter's shape}``."""
        pieces = torch.split(v, self._numels)
        return {
            n: t.reshape(s)
            for n, t, s in zip(self.param_names, pieces, self.param_shapes, strict=True)
        }

    def flatten(self, tensors: dict[str, Tensor] | Iterable[Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten` (a dict keyed by name, or tensors in order)."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.param_names]
        return torch.cat([t.reshape(-1) for t in tensors])

    # ---------------------------------------------------------------- the functions

    def _logits(self, theta: Tensor, x: Tensor) -> Tensor:
        tensors = {**self._fixed, **self.unflatten(theta)}
        logits: Tensor = functional_call(self._model, tensors, (x,))
        return logits

    def _loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self._logits(theta, x), y)

    def _cached_vjp(self, make: Callable[[], _VjpFn]) -> _VjpFn:
        """The current batch's vjp function, built once when graphs are cached."""
        index = self._batch_index
        self._batch_index += 1
        if self._cache is None:
            return make()
        if index == len(self._cache):
            self._cache.append(make())
        return self._cache[index]

    def _pass(self, batch_fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        self._batch_index = 0
        return _data_pass(
            batch_fn,
            self.source,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
            num_samples=self.num_samples,
        )

    def _hvp_double_backward(self, x: Tensor, y: Tensor, vs: Tensor) -> Tensor:
        """(K, P) -> (K, P): rows H_b v_k; the gradient graph is built once per batch."""
        grad_fn = grad(self._loss)
        vjp_fn = self._cached_vjp(lambda: vjp(lambda t: grad_fn(t, x, y), self.params)[1])
        return _map_rows(lambda v: vjp_fn(v)[0], vs, self.chunk_size)

    def _hvp_forward_over_reverse(self, x: Tensor, y: Tensor, vs: Tensor) -> Tensor:
        """(K, P) -> (K, P): rows H_b v_k as directional derivatives of the gradient."""
        grad_fn = grad(self._loss)
        theta = self.params
        return _map_rows(
            lambda v: jvp(lambda t: grad_fn(t, x, y), (theta,), (v,))[1], vs, self.chunk_size
        )

    def _ggn_block(self, x: Tensor, y: Tensor, vs: Tensor) -> Tensor:
        """(K, P) -> (K, P): rows J^T (diag p - p p^T) J v_k / n_b for the batch."""
        theta = self.params

        def logits(t: Tensor) -> Tensor:
            return self._logits(t, x)

        z, vjp_fn = vjp(logits, theta)[:2]
        p = torch.softmax(z.detach(), dim=1)
        n_terms = z.numel() // z.shape[1]  # cross-entropy averages over these

        def one(v: Tensor) -> Tensor:
            jv = jvp(logits, (theta,), (v,))[1]
            m = p * jv - p * (p * jv).sum(dim=1, keepdim=True)
            product: Tensor = vjp_fn(m / n_terms)[0]
            return product

        return _map_rows(one, vs, self.chunk_size)

    # ------------------------------------------------------------------- public API

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for V of shape (P, K), in one pass over the data (K HVPs)."""
        if V.dim() != 2 or V.shape[0] != self.num_params:
            raise UsageError(
                f"expected a block of shape ({self.num_params}, K), got {tuple(V.shape)}"
            )
        V = V.to(device=self.device, dtype=self.dtype)
        k = V.shape[1]
        if k == 0:
            return V.clone()
        vs = V.T.contiguous()
        (hv,) = self._pass(lambda x, y: (self._block(self, x, y, vs),))
        out = hv.T
        if self.l2:
            out = out + self.l2 * V
        self.hvps += k
        if self.progress is not None:
            self.progress(self.hvps)
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for v of shape (P,) (one pass over the data)."""
        if v.dim() != 1:
            raise UsageError(
                f"expected a vector of shape ({self.num_params},), got {tuple(v.shape)}"
            )
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def gradient(self) -> Tensor:
        """Flat gradient (P,) of the mean cross-entropy (without the l2 term)."""
        grad_fn = grad(self._loss)
        (g,) = self._pass(lambda x, y: (grad_fn(self.params, x, y),))
        return g

    @torch.no_grad()
    def loss_and_accuracy(self) -> tuple[float, float]:
        """Mean cross-entropy (without the l2 term) and accuracy at the measured point,
        with the same BatchNorm mode, batches and dtype as the curvature.
        """

        def batch_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            z = self._logits(self.params, x)
            loss = F.cross_entropy(z, y)
            acc = (z.argmax(dim=1) == y).to(self.dtype).mean()
            return loss, acc

        loss, acc = self._pass(batch_fn)
        return float(loss), float(acc)

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A float64 scipy ``LinearOperator`` applying this operator (for references and
        benchmarks; needs scipy).
        """
        import scipy.sparse.linalg

        def matmat(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(self.num_params, -1))
            return self.matmat(t).detach().to("cpu", torch.float64).numpy()

        def matvec(x: np.ndarray) -> np.ndarray:
            return matmat(x).reshape(-1)

        return scipy.sparse.linalg.LinearOperator(
            shape=self.shape, dtype=np.float64, matvec=matvec, rmatvec=matvec, matmat=matmat
        )

    def astype(self, dtype: torch.dtype) -> CurvatureOperator:
        """The same operator (model, data, batches, BatchNorm mode, parameter block, l2)
        computed in ``dtype``, cast from the original tensors rather than from this
        operator's: e.g. a float64 re-check of a float32 operator (see
        :func:`flatcli.curvature.lanczos.lanczos`). Its ``hvps`` start at 0; no progress
        callback, no cached graphs.
        """
        if not dtype.is_floating_point:
            raise UsageError(f"dtype must be a floating-point type, got {dtype}")
        new = copy.copy(self)

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        new.dtype = dtype
        new.params = torch.cat([cast(self._sources[n]).reshape(-1) for n in self.param_names])
        new._fixed = {n: cast(self._sources[n]) for n in self._fixed}
        new.hvps = 0
        new.progress = None
        new._cache = None
        new._batch_index = 0
        return new

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator({self.curvature.value}, P={self.num_params}, N={self.num_samples}, "
            f"bn_mode={self.bn_mode.value}, method={self.method.value}, dtype={self.dtype}, "
            f"device={self.device}, l2={self.l2})"
        )
