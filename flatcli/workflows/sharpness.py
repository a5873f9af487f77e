"""Sharpness of a saved model: load a checkpoint and its data, check them, measure.

:func:`sharpness` measures a module or a checkpoint; :func:`checkpoint_sharpness`, its
checkpoint branch, is what ``flatcli sharpness`` and ``flatcli compare`` call;
:func:`load_point` loads a checkpoint with the data it is measured on, refusing (before
any measurement) weights that are not finite and data the model cannot take. A run
directory's results are cached in its ``sharpness.json``
(:mod:`flatcli.workflows.cache`); ``use_cache=False`` recomputes.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from flatcli.analysis.measures import measure, non_finite_tensors
from flatcli.analysis.progress import ProgressCallback
from flatcli.analysis.scale import eval_mode
from flatcli.analysis.sharpness_report import SharpnessReport
from flatcli.config import SharpnessConfig
from flatcli.curvature.batches import DataSource, StreamedData, TensorData, as_source
from flatcli.distributed import resolve_device
from flatcli.errors import CheckpointError, DataError, NonFiniteError, UsageError, few, first_line
from flatcli.models.factory import LogitsOf, ModelFactory, pick_logits
from flatcli.workflows import data as _data
from flatcli.workflows.cache import ResultCache, cache_file, cache_key, measure_cached
from flatcli.workflows.checkpoint import CheckpointInfo, load_checkpoint, resolve_checkpoint_path
from flatcli.workflows.data import DATASETS
from flatcli.workflows.provenance import provenance
from flatcli.workflows.source import DEFAULT_SOURCE, CheckpointSource

__all__ = ["MeasuredPoint", "cache_file", "checkpoint_sharpness", "load_point", "sharpness"]


@dataclass(frozen=True)
class MeasuredPoint:
    """A model in eval mode on its device, with the data it is measured on."""

    model: nn.Module
    info: CheckpointInfo
    inputs: torch.Tensor
    targets: torch.Tensor
    dataset: str


def load_point(
    path: str | os.PathLike[str],
    source: CheckpointSource = DEFAULT_SOURCE,
    *,
    split: str = "train",
    samples: int | None = None,
    download: bool = False,
) -> MeasuredPoint:
    """Load a checkpoint and the (unaugmented) data it is to be measured on: the model as
    ``source`` builds it, on its device, and the ``split`` (the first ``samples``) of its
    data set.

    Refused here, before any measurement, with one clear error: NaN or Inf weights
    (:class:`~flatcli.errors.NonFiniteError`), and a data set whose inputs do not have the
    checkpoint's input shape, or whose labels the model has no output for
    (:class:`~flatcli.errors.DataError`). Measuring on another data set of the same shape
    than the checkpoint's is allowed, with a warning.
    """
    with warnings.catch_warnings(record=True) as caught:  # its NaN warning becomes the error below
        warnings.simplefilter("always")
        model, info = load_checkpoint(
            path,
            model_factory=source.model_factory,
            factory_args=source.factory_args,
            output=source.output,
        )
    bad = non_finite_tensors(model)
    if bad:
        names = few(bad)
        raise NonFiniteError(
            f"{info.path} has non-finite weights (NaN or Inf) in {names}: its curvature is undefined",
            hint="measure an earlier checkpoint, or retrain with a smaller learning rate",
        )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    meta = info.dataset if isinstance(info.dataset, dict) else {}
    trained_on = meta.get("name") if isinstance(meta.get("name"), str) else None
    dataset = source.dataset
    name = dataset or trained_on
    if not name:
        raise DataError(
            "the checkpoint does not say which data set it was trained on", hint="pass --dataset"
        )
    if dataset is None and name not in DATASETS:  # a name from the file: the file's fault (exit 1)
        raise CheckpointError(
            f"{info.path} was trained on {name!r}, a data set flatcli does not know",
            hint=f"pass --dataset (one of: {', '.join(DATASETS)})",
        )
    expected = _shape(meta.get("input_shape"))
    if (
        expected is not None and name in DATASETS and DATASETS[name].input_shape != expected
    ):  # before loading it
        raise _shape_error(name, DATASETS[name].input_shape, expected, trained_on)
    x, y = _data.load_dataset(
        name, split, source.data_dir, download=download, samples=samples
    ).tensors
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise _shape_error(name, tuple(x.shape[1:]), expected, trained_on)
    if trained_on and name != trained_on:
        warnings.warn(
            f"measuring on {name}, but the checkpoint was trained on {trained_on}", stacklevel=2
        )
    model = model.to(resolve_device(source.device))
    if len(x) == 0:
        raise DataError(f"{name} has no samples")
    _check_takes(model, as_source(x, y), None, name)
    return MeasuredPoint(model, info, x, y, name)


def _shape(value: object) -> tuple[int, ...] | None:
    """The checkpoint's ``input_shape`` as a tuple, None when absent or malformed."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return tuple(value)


def _shape_error(
    name: str, got: tuple[int, ...], expected: tuple[int, ...], trained_on: str | None
) -> DataError:
    def fmt(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape))

    origin = f" ({trained_on})" if trained_on else ""
    return DataError(
        f"{name} has inputs of shape {fmt(got)}, but the checkpoint takes {fmt(expected)}{origin}",
        hint=f"measure it on a data set of shape {fmt(expected)}"
        + (f", e.g. --dataset {trained_on}" if trained_on else ""),
    )


def sharpness(
    model_or_path: nn.Module | str | os.PathLike[str],
    data: object = None,
    *,
    measures: str | Sequence[str] | None = None,
    config: SharpnessConfig | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    model_factory: ModelFactory | None = None,
    factory_args: Mapping[str, object] | None = None,
    output: str | int | None = None,
    use_cache: bool = True,
    progress: ProgressCallback | None = None,
    status: Callable[[str], None] | None = None,
    **settings: Any,
) -> SharpnessReport:
    """Measure the curvature of a model: an ``nn.Module`` or a checkpoint (file or run
    directory); see ``measures``.

    ``data``: a pair ``(inputs, targets)`` of tensors, a ``torch.utils.data.DataLoader``
    or any re-iterable of ``(x, y)`` batches (streamed batch by batch, once per data
    pass; a loader that shuffles or augments at random is refused, since every pass must
    see the same function: :mod:`flatcli.curvature.batches`). Required with a module;
    with a checkpoint it defaults to the checkpoint's own data set (``dataset``,
    ``data_dir``, ``config.split`` and ``config.samples`` choose it). ``measures``: names
    as a list or one comma-separated string; ``**settings``: fields of
    :class:`SharpnessConfig` (``dtype="float64"``, ``tol=1e-6``, ...), applied over
    ``config``. ``sharpness(path, config)`` (a config as second argument) still works.
    A module is measured where its parameters live (``device`` is for checkpoints) and
    is never changed: no parameter, buffer or train/eval flag. A forward that returns a
    dict, tuple or output object is read through :func:`flatcli.models.factory.pick_logits`
    (``output`` names the logits when its rules do not find them).

    A run directory keeps each measure's result in ``sharpness.json`` (see
    :class:`~flatcli.workflows.cache.ResultCache`), keyed by everything that decides its numbers. Measures found
    there are not computed again (``report.cached`` names them); ``use_cache=False``
    recomputes every one. The cache never costs the result: one that cannot be read or
    written is a warning.
    """
    if isinstance(data, SharpnessConfig):  # sharpness(path, config): the signature before data
        config, data = data, None
    config = _settings(config, measures, settings)
    source = CheckpointSource(
        dataset=dataset,
        data_dir=data_dir,
        device=device,
        model_factory=model_factory,
        factory_args=factory_args,
        output=output,
    )
    if isinstance(model_or_path, nn.Module) or data is not None:
        return _with_provenance(
            _measure_given(model_or_path, data, config, source, progress=progress, status=status)
        )
    return checkpoint_sharpness(
        model_or_path, config, source, use_cache=use_cache, progress=progress, status=status
    )


def checkpoint_sharpness(
    path: str | os.PathLike[str],
    config: SharpnessConfig,
    source: CheckpointSource = DEFAULT_SOURCE,
    *,
    use_cache: bool = True,
    progress: ProgressCallback | None = None,
    status: Callable[[str], None] | None = None,
) -> SharpnessReport:
    """:func:`sharpness` of a checkpoint (file or run directory), loaded as ``source``
    says, on the ``config.split`` (the first ``config.samples``) of its data set, with the
    run directory's cache; what ``flatcli sharpness`` and ``flatcli compare`` call.
    """
    start = time.perf_counter()
    ckpt = resolve_checkpoint_path(path)
    point = load_point(ckpt, source, split=config.split, samples=config.samples)
    where = cache_file(ckpt)
    l2 = (
        float(point.info.train.get("l2", 0.0) or 0.0) if isinstance(point.info.train, dict) else 0.0
    )

    def run(cfg: SharpnessConfig) -> SharpnessReport:
        return measure(
            point.model,
            point.inputs,
            point.targets,
            cfg,
            l2=l2,
            progress=progress,
            status=status,
            checkpoint=str(ckpt),
            dataset=point.dataset,
        )

    if where is None:
        return _with_provenance(run(config))
    key = cache_key(
        config,
        model=point.model,
        checkpoint=point.info.path,
        dataset=point.dataset,
        inputs=point.inputs,
        targets=point.targets,
    )
    report = measure_cached(
        ResultCache(where),
        key,
        config,
        run,
        checkpoint=ckpt,
        dataset=point.dataset,
        use_cache=use_cache,
        start=start,
    )
    return _with_provenance(report)


def _with_provenance(report: SharpnessReport) -> SharpnessReport:
    """``report`` with the provenance of this call (also when its measures came from the cache)."""
    return replace(report, provenance=provenance(torch.device(report.device)))


def _settings(
    config: SharpnessConfig | None, measures: str | Sequence[str] | None, settings: dict[str, Any]
) -> SharpnessConfig:
    """``config`` (default: the defaults) with ``measures`` and ``settings`` applied; an
    unknown setting is one :class:`~flatcli.errors.UsageError` naming the valid ones.
    """
    valid = sorted(f.name for f in fields(SharpnessConfig) if f.init)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise UsageError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
            hint=f"valid settings: {', '.join(valid)}",
        )
    if config is not None and not isinstance(config, SharpnessConfig):
        raise UsageError(f"config must be a SharpnessConfig, got {type(config).__name__}")
    if measures is not None:
        names = measures.split(",") if isinstance(measures, str) else list(measures)
        settings["measures"] = tuple(str(m).strip() for m in names if str(m).strip())
    if isinstance(settings.get("dtype"), torch.dtype):  # torch.float64 as well as "float64"
        settings["dtype"] = str(settings["dtype"]).removeprefix("torch.")
    try:
        return replace(config, **settings) if config is not None else SharpnessConfig(**settings)
    except TypeError as exc:  # e.g. tol="small": a value of the wrong type
        raise UsageError(f"a setting has a value of the wrong type ({exc})") from None


def _measure_given(
    model_or_path: nn.Module | str | os.PathLike[str],
    data: object,
    config: SharpnessConfig,
    source: CheckpointSource,
    *,
    progress: ProgressCallback | None,
    status: Callable[[str], None] | None,
) -> SharpnessReport:
    """:func:`sharpness` of a module, or of a checkpoint on data given by the caller
    (no ``sharpness.json`` cache: it is keyed by the checkpoint's own data).
    """
    if data is None:
        raise UsageError(
            "a model given as a module needs data",
            hint="pass data=(inputs, targets), a DataLoader, or an iterable of (x, y) batches",
        )
    if config.samples is not None:
        raise UsageError(
            "samples chooses a subset of a checkpoint's own data set, not of data given",
            hint="pass the subset as data",
        )
    given = as_source(data)  # a stream is read twice here and refused if it changes
    device, output = source.device, source.output
    l2, checkpoint = 0.0, None
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        first = next(iter(model.parameters()), None)
        if first is None:
            raise UsageError("the model has no parameters")
        if device != "auto" and torch.device(device).type != first.device.type:
            raise UsageError(
                f"the model lives on {first.device}, not {device}: a module is measured where it is",
                hint="move it first (model.to(device)), or leave device unset",
            )
    else:
        ckpt = resolve_checkpoint_path(model_or_path)
        model, info = load_checkpoint(
            ckpt,
            model_factory=source.model_factory,
            factory_args=source.factory_args,
            output=output,
        )
        model = model.to(resolve_device(device))
        l2 = float(info.train.get("l2", 0.0) or 0.0) if isinstance(info.train, dict) else 0.0
        checkpoint, output = str(ckpt), None  # load_checkpoint applied output
    flag = model.training  # LogitsOf's train/eval also set the wrapped model's own flag
    try:
        model = _check_takes(model, given, output)
        return measure(
            model, given, config, l2=l2, progress=progress, status=status, checkpoint=checkpoint
        )
    finally:
        (model.wrapped if isinstance(model, LogitsOf) else model).training = flag


def _check_takes(
    model: nn.Module, source: DataSource, output: str | int | None, name: str = "the data"
) -> nn.Module:
    """One forward pass of one input, in eval mode (every module's flag restored): the
    model takes the data and has an output for every label. Returns the model to
    measure: wrapped in :class:`~flatcli.models.factory.LogitsOf` when its forward returns more
    than a tensor of logits (a dict, a tuple, an output object) or ``output`` is given.
    """
    first = next(model.parameters())
    x = source.example.to(first.device)
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x.to(first.dtype) if x.is_floating_point() else x)
    except (
        RuntimeError,
        ValueError,
        TypeError,
    ) as exc:  # e.g. a factory's model that does not fit the data
        raise DataError(
            f"the model cannot take {name}'s inputs of shape {tuple(x.shape[1:])}: {first_line(exc)}"
        ) from None
    if output is not None or not isinstance(out, torch.Tensor):
        out = pick_logits(out, output)  # one clear line when the logits cannot be found
        model = LogitsOf(model, output)
    if out.ndim != 2:
        raise DataError(
            f"the model gives outputs of shape {tuple(out.shape[1:])} per input, not one logit per class"
        )
    if isinstance(source, TensorData):
        top = int(source.targets.max())
    elif isinstance(source, StreamedData):
        top = source.max_label
    else:  # a source of the caller's own kind: its labels are its to check
        return model
    if top >= out.shape[1]:
        raise DataError(
            f"{name} has labels up to {top}, but the model has only {out.shape[1]} outputs"
        )
    return model
