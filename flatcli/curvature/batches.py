"""Where the data of a curvature measurement comes from: tensors in memory, or a stream.

The curvature of the mean loss L(w) = (1/N) sum_i l_i(w) is a sum over batches
sum_b (n_b / N) L_b(w) however the N samples are cut (``_data_pass`` in
:mod:`flatcli.curvature.operator` weights each batch mean by its share), so the data may
come as

* a pair ``(inputs, targets)`` of tensors (:class:`TensorData`), cut into slices of the
  operator's ``batch_size``, or
* any re-iterable of ``(x, y)`` batches, e.g. a ``torch.utils.data.DataLoader``
  (:class:`StreamedData`): each data pass iterates it exactly once, batch by batch, so a
  data set that does not fit in memory, or that needs its own transforms, can be measured.
  The loader's batches are the batches (``batch_size`` does not apply; with BatchNorm on
  batch statistics they define the matrix), and N is the number of samples it yields
  (``drop_last=True`` leaves a last partial batch out of the measured set).

Every estimator multiplies by the SAME matrix pass after pass (Lanczos and Hutch++
assume it), so a stream must give the same samples in the same batches every time it is
iterated. Shuffling or random augmentation would make each pass measure another function:
a ``DataLoader`` whose sampler shuffles is refused up front, and on construction the
stream is iterated twice and a fingerprint of every batch (its size, its labels, a sha256
of its inputs' bytes) compared, as curvlinops does with two loss/gradient/product
evaluations (Dangel et al., curvlinops, ``_check_deterministic``); that check costs two
reads of the data and no model evaluation. Every later pass checks batch sizes and labels
again, which costs nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from flatcli.errors import DataError, UsageError


def _check_targets(y: Tensor, where: str) -> None:
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dim() != 1:
        got = (
            f"dtype {y.dtype} and shape {tuple(y.shape)}"
            if isinstance(y, Tensor)
            else type(y).__name__
        )
        hint = "pass one integer class label per input"
        if isinstance(y, Tensor) and y.dim() == 0:
            hint = (
                "this looks like a Dataset of single samples: wrap it in "
                "torch.utils.data.DataLoader(dataset, batch_size=...)"
            )
        raise DataError(
            f"{where}: targets must be a 1-D tensor of integer class labels, got {got}", hint
        )


class DataSource:
    """The measured samples, as batches. ``num_samples`` is N, the count every batch
    weight ``n_b / N`` divides by.
    """

    #: True when the batches are the source's own (a stream): ``batch_size`` does not apply.
    streamed: bool = False
    num_samples: int
    #: One input (a batch of 1), for measuring activation sizes.
    example: Tensor

    def batches(self, batch_size: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        """The ``(x, y)`` batches of one data pass (``batch_size`` if the source cuts)."""
        raise NotImplementedError


class TensorData(DataSource):
    """``(inputs, targets)`` in memory, cut into consecutive slices of ``batch_size``."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise UsageError(
                "data must be a pair of tensors (inputs, targets), a DataLoader or "
                "an iterable of (inputs, targets) batches"
            )
        if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
            raise UsageError(
                f"{inputs.shape[0] if inputs.dim() else 0} inputs but "
                f"{targets.shape[0] if targets.dim() else 0} targets",
                "pass one integer class label per input",
            )
        if inputs.shape[0] == 0:
            raise UsageError("the data set is empty", "pass at least one sample")
        if targets.is_floating_point() or targets.is_complex() or targets.dim() != 1:
            raise UsageError(
                "targets must be a 1-D tensor of integer class labels",
                f"got dtype {targets.dtype} and shape {tuple(targets.shape)}",
            )
        self.inputs, self.targets = inputs, targets
        self.num_samples = inputs.shape[0]
        self.example = inputs[:1]

    def batches(self, batch_size: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive slices of ``batch_size`` samples (all N when None)."""
        step = batch_size or self.num_samples
        for start in range(0, self.num_samples, step):
            yield self.inputs[start : start + step], self.targets[start : start + step]


def _unpack(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, Tensor) for t in batch)
    ):
        x, y = batch
        if x.dim() == 0 or x.shape[0] != (y.shape[0] if y.dim() else -1):
            _check_targets(y, f"batch {index}")
            raise DataError(
                f"batch {index} has {x.shape[0] if x.dim() else 0} inputs but {len(y)} targets"
            )
        return x, y
    raise DataError(
        f"batch {index} is a {type(batch).__name__}, not a pair (inputs, targets) of tensors",
        "iterate over (x, y) batches, e.g. a DataLoader over a TensorDataset",
    )


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 (hex) of tensors' dtypes, shapes and exact bytes: the identity of data.

    It changes whenever any value, the order, the subset or the dtype does: a stream's
    batches are compared by it, and the ``sharpness.json`` cache is keyed by it.
    """
    h = hashlib.sha256()
    for x in tensors:
        t = x.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _random_sampler(loader: Any) -> str | None:
    """The name of a DataLoader's shuffling sampler, if it has one."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (
        getattr(loader, "sampler", None),
        getattr(batch_sampler, "sampler", None),
        batch_sampler,
    ):
        if (
            isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler))
            or getattr(sampler, "shuffle", False) is True
        ):  # e.g. DistributedSampler(shuffle=True)
            return type(sampler).__name__
    return None


class StreamedData(DataSource):
    """A re-iterable of ``(x, y)`` batches (a DataLoader, a list of batches, ...), read
    batch by batch on every data pass and checked to be the same every time.

    Construction iterates it twice: the first pass counts N and records each batch's
    size, labels and input digest; the second must match it batch for batch. Refused
    with a :class:`~flatcli.errors.DataError` (one line): a shuffling sampler, a one-shot
    iterator, an empty stream, batches that are not ``(x, y)`` tensor pairs with 1-D
    integer labels, and a stream whose two passes differ (shuffling, random augmentation).
    Every later pass re-checks batch sizes and labels.
    """

    streamed = True

    def __init__(self, data: Iterable[Any]) -> None:
        sampler = _random_sampler(data)
        if sampler is not None:
            raise DataError(
                f"the DataLoader shuffles (its sampler is a {sampler}): each data pass would measure "
                "the loss on differently cut batches, and its curvature must be of one fixed function",
                "build the loader with shuffle=False and no random sampler",
            )
        if isinstance(data, Dataset) and not isinstance(data, Iterable):
            raise DataError(
                f"a {type(data).__name__} gives single samples, not batches",
                "wrap it in torch.utils.data.DataLoader(dataset, batch_size=...)",
            )
        if not isinstance(data, Iterable):
            raise UsageError(
                f"data of type {type(data).__name__} is not a pair (inputs, targets) of tensors, "
                "a DataLoader, or an iterable of (x, y) batches"
            )
        if isinstance(data, Iterator):  # a generator: a second pass would find it exhausted
            raise DataError(
                "the data is a one-shot iterator, but every data pass must iterate it again",
                "pass a DataLoader, a list of (x, y) batches, or a pair of tensors",
            )
        self.data = data
        self.max_label = -1  # the largest label (checked against the model's outputs)
        first = self._read()
        if not first:
            raise DataError("the data loader gives no batches", "pass at least one sample")
        second = self._read()
        # the common batches first (a differing count is named below)
        for i, (a, b) in enumerate(zip(first, second, strict=False)):
            if a != b:
                what = "batch sizes" if a[0] != b[0] else "labels" if a[1] != b[1] else "inputs"
                raise DataError(
                    f"the data changes between passes (batch {i}: different {what}): "
                    "a loader that shuffles or augments at random gives another loss each pass, "
                    "and its curvature must be of one fixed function",
                    "use shuffle=False and the transforms of evaluation (no random augmentation)",
                )
        if len(first) != len(second):
            raise DataError(
                f"the data changes between passes ({len(first)} batches, then {len(second)})",
                "use a loader that gives the same batches every time it is iterated",
            )
        self.sizes: tuple[int, ...] = tuple(n for n, _, _ in first)
        self._labels = tuple(y for _, y, _ in first)
        self.num_samples = sum(self.sizes)
        #: The largest batch (the loader's batch size): with BatchNorm on batch statistics
        #: it defines the matrix and is reported as ``bn_batch_size``.
        self.batch_size: int = max(self.sizes)
        #: sha256 of every batch's labels and inputs: the identity of the data measured
        self.digest = hashlib.sha256("".join(a + b for _, a, b in first).encode()).hexdigest()

    def _read(self) -> list[tuple[int, str, str]]:
        prints: list[tuple[int, str, str]] = []
        for i, batch in enumerate(self.data):
            x, y = _unpack(batch, i)
            _check_targets(y, f"batch {i}")
            if len(y) == 0:  # its mean loss would be NaN, and NaN times a weight of 0 is NaN
                raise DataError(f"batch {i} is empty", "give the loader no empty batches")
            if not prints:
                self.example = x[:1].detach().clone()
            self.max_label = max(self.max_label, int(y.max()))
            prints.append((x.shape[0], tensor_digest(y), tensor_digest(x)))
        return prints

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The stream's own batches (``batch_size`` is ignored), checked against the
        batch sizes and labels seen on construction.
        """
        count = 0
        for i, batch in enumerate(self.data):
            x, y = _unpack(batch, i)
            if (
                i >= len(self.sizes)
                or x.shape[0] != self.sizes[i]
                or tensor_digest(y) != self._labels[i]
            ):
                raise DataError(
                    f"the data changed since it was checked (batch {i})",
                    "use a loader that gives the same batches every time it is iterated",
                )
            count += 1
            yield x, y
        if count != len(self.sizes):
            raise DataError(
                f"the data changed since it was checked ({count} batches, not {len(self.sizes)})",
                "use a loader that gives the same batches every time it is iterated",
            )

    def gather(self) -> TensorData:
        """All batches concatenated in memory (one batch of N: BatchNorm mode ``"full"``)."""
        xs, ys = zip(*self.batches(), strict=True)
        return TensorData(torch.cat(xs), torch.cat(ys))


def as_source(data: Any, targets: Tensor | None = None) -> DataSource:
    """A :class:`DataSource` from ``(inputs, targets)`` tensors (as two arguments or one
    pair), a DataLoader or another re-iterable of ``(x, y)`` batches; a source as is.
    """
    if isinstance(data, DataSource):
        return data
    if targets is not None:
        return TensorData(data, targets)
    if isinstance(data, Tensor):
        raise UsageError(
            "inputs were given without targets",
            "pass (inputs, targets), a DataLoader, or an iterable of (x, y) batches",
        )
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return TensorData(*data)
    return StreamedData(data)


__all__ = ["DataSource", "StreamedData", "TensorData", "as_source"]
