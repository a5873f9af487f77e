"""Sharpness of a saved model: load a checkpoint and its data, measure, cache.

:func:`sharpness` is what ``flatcli sharpness`` and ``flatcli compare`` call. A run
directory keeps its results in ``sharpness.json``, one per measure, keyed by the settings,
the exact data measured (sha256 of inputs and labels), the device, the code and the
checkpoint's content hash, so that a second request for measures already measured with the
same settings (say from ``compare``; a subset, in any order) computes nothing and gives the
same numbers; ``use_cache=False`` recomputes. See :class:`ResultCache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatcli import __version__
from flatcli.analysis.measures import (
    PER_LAYER,
    LayerReport,
    SharpnessConfig,
    SharpnessReport,
    measure,
    non_finite_tensors,
)
from flatcli.curvature.batches import DataSource, StreamedData, as_source, tensor_digest
from flatcli.distributed import broadcast_object, is_main
from flatcli.errors import CheckpointError, DataError, NonFiniteError, UsageError, few, first_line
from flatcli.models.factory import LogitsOf, import_factory, pick_logits  # noqa: F401  (import_factory: as before)
from flatcli.workflows import data as _data
from flatcli.workflows.checkpoint import (
    MODEL_FILE,
    CheckpointInfo,
    atomic_write_text,
    load_checkpoint,
    resolve_checkpoint_path,
)
from flatcli.workflows.data import DATASETS
from flatcli.workflows.training import resolve_device

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, concurrent writers may lose an entry
    fcntl = None

CACHE_FILE = "sharpness.json"


@dataclass(frozen=True)
class MeasuredPoint:
    """A model in eval mode on its device, with the data it is measured on."""

    model: nn.Module
    info: CheckpointInfo
    inputs: torch.Tensor
    targets: torch.Tensor
    dataset: str


def load_point(
    path: str | os.PathLike,
    *,
    split: str = "train",
    samples: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    model_factory: str | Callable[..., nn.Module] | None = None,
    factory_args: dict | None = None,
    output: str | int | None = None,
    download: bool = False,
) -> MeasuredPoint:
    """Load a checkpoint and the (unaugmented) data it is to be measured on.

    Refused here, before any measurement, with one clear error: NaN or Inf weights
    (:class:`~flatcli.errors.NonFiniteError`), and a data set whose inputs do not have the
    checkpoint's input shape, or whose labels the model has no output for
    (:class:`~flatcli.errors.DataError`). Measuring on another data set of the same shape
    than the checkpoint's is allowed, with a warning.
    """
    with warnings.catch_warnings(record=True) as caught:  # its NaN warning becomes the error below
        warnings.simplefilter("always")
        model, info = load_checkpoint(
            path, model_factory=model_factory, factory_args=factory_args, output=output
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
    x, y = _data.load_dataset(name, split, data_dir, download=download, samples=samples).tensors
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise _shape_error(name, tuple(x.shape[1:]), expected, trained_on)
    if trained_on and name != trained_on:
        warnings.warn(
            f"measuring on {name}, but the checkpoint was trained on {trained_on}", stacklevel=2
        )
    model = model.to(resolve_device(device))
    if len(x) == 0:
        raise DataError(f"{name} has no samples")
    _check_takes(model, as_source(x, y), None, name)
    return MeasuredPoint(model, info, x, y, name)


def _shape(value) -> tuple[int, ...] | None:
    """The checkpoint's ``input_shape`` as a tuple, None when absent or malformed."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return tuple(value)


def _shape_error(
    name: str, got: tuple[int, ...], expected: tuple[int, ...], trained_on: str | None
) -> DataError:
    def fmt(shape):
        return "x".join(map(str, shape))

    origin = f" ({trained_on})" if trained_on else ""
    return DataError(
        f"{name} has inputs of shape {fmt(got)}, but the checkpoint takes {fmt(expected)}{origin}",
        hint=f"measure it on a data set of shape {fmt(expected)}"
        + (f", e.g. --dataset {trained_on}" if trained_on else ""),
    )


def cache_file(path: str | os.PathLike) -> Path | None:
    """The ``sharpness.json`` of a run directory (or of its ``model.safetensors``); None for another file."""
    ckpt = resolve_checkpoint_path(path)
    return ckpt.parent / CACHE_FILE if ckpt.name == MODEL_FILE else None


def sharpness(
    model_or_path: nn.Module | str | os.PathLike,
    data: Any = None,
    *,
    measures: str | Sequence[str] | None = None,
    config: SharpnessConfig | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    model_factory: str | Callable[..., nn.Module] | None = None,
    factory_args: dict | None = None,
    output: str | int | None = None,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
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
    :class:`ResultCache`), keyed by everything that decides its numbers. Measures found
    there are not computed again (``report.cached`` names them); ``use_cache=False``
    recomputes every one. The cache never costs the result: one that cannot be read or
    written is a warning.
    """
    start = time.perf_counter()
    if isinstance(data, SharpnessConfig):  # sharpness(path, config): the signature before data
        config, data = data, None
    config = _settings(config, measures, settings)
    if isinstance(model_or_path, nn.Module) or data is not None:
        return _measure_given(
            model_or_path,
            data,
            config,
            device=device,
            model_factory=model_factory,
            factory_args=factory_args,
            output=output,
            progress=progress,
            status=status,
        )
    ckpt = resolve_checkpoint_path(model_or_path)
    point = load_point(
        ckpt,
        split=config.split,
        samples=config.samples,
        dataset=dataset,
        data_dir=data_dir,
        device=device,
        model_factory=model_factory,
        factory_args=factory_args,
        output=output,
    )
    cache = ResultCache(ckpt.parent / CACHE_FILE) if ckpt.name == MODEL_FILE else None
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

    if cache is None:
        return run(config)
    key = cache_key(point, config)
    wanted = {name: measure_slot(name, config) for name in _with_implied(config.measures)}
    # under torchrun rank 0 alone reads and writes the cache, and tells the others what it found
    found = broadcast_object(cache.lookup(key, wanted, config) if use_cache and is_main() else None)
    if found is not None and found.hits == set(wanted):  # all from the cache: no model evaluation
        report = found.report(ckpt, point.dataset, config)
        return replace(
            report, hvps=0, seconds=time.perf_counter() - start, cached=tuple(report.measures)
        )
    todo = _to_compute(config, wanted, found.hits if found is not None else set())
    computed = run(replace(config, measures=todo))
    if is_main():
        cache.store(key, computed, config)
    if found is None or not found.hits:
        return computed
    return _merge(
        computed,
        found.report(ckpt, point.dataset, config, only=found.hits),
        config,
        seconds=time.perf_counter() - start,
    )


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
    model_or_path: nn.Module | str | os.PathLike,
    data: Any,
    config: SharpnessConfig,
    *,
    device: str,
    model_factory,
    factory_args,
    output,
    progress,
    status,
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
    source = as_source(data)  # a stream is read twice here and refused if it changes
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
            ckpt, model_factory=model_factory, factory_args=factory_args, output=output
        )
        model = model.to(resolve_device(device))
        l2 = float(info.train.get("l2", 0.0) or 0.0) if isinstance(info.train, dict) else 0.0
        checkpoint, output = str(ckpt), None  # load_checkpoint applied output
    flag = model.training  # LogitsOf's train/eval also set the wrapped model's own flag
    try:
        model = _check_takes(model, source, output)
        return measure(
            model, source, config, l2=l2, progress=progress, status=status, checkpoint=checkpoint
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
    from flatcli.analysis.scale import _eval_mode

    first = next(model.parameters())
    x = source.example.to(first.device)
    try:
        with _eval_mode(model), torch.no_grad():
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
    top = source.max_label if isinstance(source, StreamedData) else int(source.targets.max())
    if top >= out.shape[1]:
        raise DataError(
            f"{name} has labels up to {top}, but the model has only {out.shape[1]} outputs"
        )
    return model


# --- the sharpness.json cache ------------------------------------------------------------

#: Version of the cache file's layout; a file of another layout is read as empty.
CACHE_FORMAT = 2

#: Measures whose numbers depend on which members of their group are asked for together
#: (one Lanczos run for both ends of the spectrum; one Hutch++ run for trace and
#: Frobenius norm, whose adaptive top-up follows the targets asked for).
_WORK_GROUPS: dict[str, tuple[str, ...]] = {
    "lambda_max": ("lambda_max", "lambda_min"),
    "lambda_min": ("lambda_max", "lambda_min"),
    "lambda_max_normalised": ("lambda_max", "lambda_min"),
    "spectral_norm": ("lambda_max", "lambda_min"),
    "trace": ("trace", "frobenius"),
    "frobenius": ("trace", "frobenius"),
    "trace_normalised": ("trace", "frobenius"),
}


def _with_implied(measures: tuple[str, ...]) -> tuple[str, ...]:
    """The measures a report holds: those asked for, then spectral_norm when both ends are."""
    implied = ("spectral_norm",) if {"lambda_max", "lambda_min"} <= set(measures) else ()
    return (*measures, *implied)


def measure_slot(name: str, config: SharpnessConfig) -> str:
    """Where measure ``name`` of a request ``config`` is cached: its name, plus the measures
    asked for with it that share its work when that changes its numbers.

    lambda_max asked for with lambda_min comes from their shared Lanczos run, which stops
    when both ends converge, so it differs (within tol) from lambda_max measured alone:
    the two live in different slots (``lambda_max@lambda_max+lambda_min`` and
    ``lambda_max@lambda_max``). Trace and Frobenius norm share their products; their
    numbers depend on which of them is asked for only through ``target_stderr``. Exact
    values (one dense spectrum) and the other measures depend on nothing but the settings.
    """
    group = _WORK_GROUPS.get(name)
    if (
        group is None
        or config.exact
        or (group == ("trace", "frobenius") and config.target_stderr is None)
    ):
        return name
    return f"{name}@{'+'.join(m for m in group if m in config.measures)}"


def _to_compute(config: SharpnessConfig, wanted: dict[str, str], hits: set[str]) -> tuple[str, ...]:
    """The measures to compute so that every missing one gets the numbers the whole request would:
    the missing ones, with every asked-for member of a work group that has a missing one.
    """
    missing = set(wanted) - hits
    groups = {_WORK_GROUPS[m] for m in missing if m in _WORK_GROUPS}
    return tuple(m for m in config.measures if m in missing or any(m in g for g in groups))


def cache_key(point: MeasuredPoint, config: SharpnessConfig) -> str:
    """What decides a result besides the measure: the code, every setting but the list of
    measures, the exact data measured (sha256 of the inputs and labels after subsetting),
    the device, the model and the checkpoint's content (sha256).
    """
    settings = asdict(config)
    del settings["measures"]
    first = next(iter(point.model.parameters()), None)
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "flatcli": __version__,
            "torch": torch.__version__,
            "config": settings,
            "dataset": point.dataset,
            "data": tensor_digest(point.inputs, point.targets),
            "device": str(first.device) if first is not None else "cpu",
            "checkpoint": _sha256(point.info.path),
            "model": repr(point.model),
        },
        sort_keys=True,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_NOT_HEAD = ("layers", "hvps", "seconds", "cached", "cached_measures")


@dataclass
class _Found:
    """What the cache holds of one request: the head (loss, accuracy, ...) and the slots found."""

    head: dict
    layers: list
    slots: dict[str, dict]  # measure name -> {"result": ..., "layers": [...]}
    hits: set[str]

    def report(
        self, ckpt: Path, dataset: str, config: SharpnessConfig, only: set[str] | None = None
    ) -> SharpnessReport:
        names = [m for m in _with_implied(config.measures) if only is None or m in only]
        doc = {**self.head, "checkpoint": str(ckpt), "dataset": dataset}
        doc.update({m: self.slots[m]["result"] for m in names})
        if config.per_layer:
            doc["layers"] = [
                {**skeleton, **{m: self.slots[m]["layers"][i] for m in names if m in PER_LAYER}}
                for i, skeleton in enumerate(self.layers)
            ]
        doc.update(hvps=0, seconds=0.0, cached=True)
        return SharpnessReport.from_dict(doc)


class ResultCache:
    """``sharpness.json`` of one run: per measure results, keyed by :func:`cache_key` and
    :func:`measure_slot`.

    Layout: ``{"format": 2, "entries": {KEY: {"head": {...}, "layers": [...],
    "measures": {SLOT: {"result": {...}, "layers": [...]}}}}}``. Every write is a
    read-modify-write under an exclusive ``fcntl.flock`` of ``sharpness.json.lock`` and an
    atomic replace, so concurrent processes keep every entry and a killed one leaves the
    old file. A file that cannot be read, parsed or written, or that has the wrong shape,
    costs one warning (per instance) and is treated as empty, then replaced on the next write.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._warned = False

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(text, stacklevel=3)

    def read(self) -> dict[str, dict]:
        """The entries; {} for a missing, unreadable, corrupt or older-layout file."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn(f"cannot read {self.path} ({exc.strerror or exc}); measuring without it")
            return {}
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return self._corrupt("not JSON")
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
            return self._corrupt(
                f"a {type(doc).__name__}, not an object with entries"
                if not isinstance(doc, dict)
                else "its entries are not an object"
            )
        if not all(isinstance(v, dict) for v in doc["entries"].values()):
            return self._corrupt("an entry is not an object")
        if (
            doc.get("format") != CACHE_FORMAT
        ):  # written by an older flatcli: recomputed, then replaced
            return {}
        return doc["entries"]

    def _corrupt(self, why: str) -> dict:
        self._warn(
            f"{self.path} is corrupt ({why}); ignoring it (it is replaced on the next write)"
        )
        return {}

    def lookup(self, key: str, wanted: dict[str, str], config: SharpnessConfig) -> _Found | None:
        """The cached head and the slots of ``wanted`` (measure -> slot) that are present."""
        entry = self.read().get(key)
        if entry is None:
            return None
        head, layers, slots = entry.get("head"), entry.get("layers"), entry.get("measures")
        if not (isinstance(head, dict) and isinstance(layers, list) and isinstance(slots, dict)):
            self._corrupt("an entry lacks head, layers or measures")
            return None
        found = {}
        for name, slot in wanted.items():
            value = slots.get(slot)
            if not (isinstance(value, dict) and isinstance(value.get("result"), dict)):
                continue
            if (
                config.per_layer
                and name in PER_LAYER
                and not (
                    isinstance(value.get("layers"), list) and len(value["layers"]) == len(layers)
                )
            ):
                continue
            found[name] = value
        result = _Found(head, layers, found, set(found))
        try:  # a well-formed file whose values are not what a report holds is as good as corrupt
            result.report(Path("."), "", config, only=result.hits)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            self._corrupt(f"unusable entry: {type(exc).__name__} {exc}")
            return None
        return result

    def store(self, key: str, report: SharpnessReport, config: SharpnessConfig) -> bool:
        """Add ``report``'s measures (computed with ``config``); False (and a warning) if it cannot be written."""
        doc = report.as_dict()
        names = list(_with_implied(tuple(m for m in config.measures if m in report.measures)))
        slots = {}
        for name in names:
            slot = {"result": doc[name]}
            if config.per_layer and name in PER_LAYER:
                slot["layers"] = [layer[name] for layer in doc.get("layers", [])]
            slots[measure_slot(name, config)] = slot
        head = {k: v for k, v in doc.items() if k not in report.measures and k not in _NOT_HEAD}
        layers = [
            {k: x[k] for k in ("name", "params", "num_params")} for x in doc.get("layers", [])
        ]
        return self.update(key, head, layers, slots)

    def update(self, key: str, head: dict, layers: list, slots: dict[str, dict]) -> bool:
        """Locked read-modify-write of one entry: set its head and layers, add ``slots``."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            return self._cannot_write(exc)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self.read()
            entry = entries.get(key)
            old = entry.get("measures") if isinstance(entry, dict) else None
            entries[key] = {
                "head": head,
                "layers": layers,
                "measures": {**(old if isinstance(old, dict) else {}), **slots},
            }
            atomic_write_text(self.path, json.dumps({"format": CACHE_FORMAT, "entries": entries}))
            return True
        except OSError as exc:  # a read-only folder, a full disk: the result is still returned
            return self._cannot_write(exc)
        finally:
            os.close(fd)  # releases the lock

    def _cannot_write(self, exc: OSError) -> bool:
        self._warn(f"could not write {self.path} ({exc.strerror or exc}); the result is not cached")
        return False


def _merge(
    computed: SharpnessReport, cached: SharpnessReport, config: SharpnessConfig, *, seconds: float
) -> SharpnessReport:
    """One report, in the order asked for, of measures computed now and measures from the cache."""
    names = _with_implied(config.measures)

    def pick(name):
        return computed.measures[name] if name in computed.measures else cached.measures[name]

    layers = (
        [
            LayerReport(
                now.name,
                now.params,
                now.num_params,
                {
                    m: (now.measures[m] if m in now.measures else old.measures[m])
                    for m in config.measures
                    if m in PER_LAYER
                },
            )
            for now, old in zip(computed.layers, cached.layers)
        ]
        if config.per_layer
        else computed.layers
    )
    return replace(
        computed,
        measures={m: pick(m) for m in names},
        layers=layers,
        seconds=seconds,
        cached=tuple(m for m in names if m not in computed.measures),
    )
