"""The ``sharpness.json`` result cache of a run directory.

A run directory keeps its results in ``sharpness.json``, one per measure, keyed by the
settings, the exact data measured (sha256 of inputs and labels), the device, the code and
the checkpoint's content hash (:func:`cache_key`), so that a second request for measures
already measured with the same settings (say from ``compare``; a subset, in any order)
computes nothing and gives the same numbers. Measures that share work are cached per
group of measures asked for together (:func:`measure_slot`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatcli import __version__
from flatcli.analysis.measures import PER_LAYER
from flatcli.analysis.sharpness_report import LayerReport, SharpnessReport
from flatcli.config import SharpnessConfig
from flatcli.curvature.batches import tensor_digest
from flatcli.distributed import broadcast_object, is_main
from flatcli.workflows.checkpoint import (
    CACHE_FILE,
    MODEL_FILE,
    atomic_write_text,
    resolve_checkpoint_path,
)

__all__ = [
    "CACHE_FILE",
    "CACHE_FORMAT",
    "ResultCache",
    "cache_file",
    "cache_key",
    "measure_cached",
    "measure_slot",
]

#: A parsed JSON object of the cache file (``json.loads`` gives values of any JSON type).
JSONObject = dict[str, Any]

#: Version of the cache file's layout; a file of another layout is read as empty (a miss:
#: measured again, then the file is replaced). 3: estimates as ``{value, uncertainty, kind,
#: converged}`` and the point's ``split_loss``/``split_accuracy`` (2 had ``{value, bound}``
#: or ``{value, stderr}`` and ``loss``/``accuracy``).
CACHE_FORMAT = 3

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

#: Keys of a report's JSON that are not part of the cached head (they describe one request).
_NOT_HEAD = ("layers", "hvps", "seconds", "cached", "cached_measures", "provenance")


def cache_file(path: str | os.PathLike[str]) -> Path | None:
    """The ``sharpness.json`` of a run directory (or of its ``model.safetensors``).

    Returns:
        The cache's path, or None for a checkpoint that is not a run's ``model.safetensors``.
    """
    ckpt = resolve_checkpoint_path(path)
    return ckpt.parent / CACHE_FILE if ckpt.name == MODEL_FILE else None


def _with_implied(measures: tuple[str, ...]) -> tuple[str, ...]:
    """The measures a report holds: those asked for, then spectral_norm when both ends are."""
    implied = ("spectral_norm",) if {"lambda_max", "lambda_min"} <= set(measures) else ()
    return (*measures, *implied)


def measure_slot(name: str, config: SharpnessConfig) -> str:
    """Where measure ``name`` of a request ``config`` is cached.

    The slot is the measure's name, plus the measures asked for with it that share its
    work when that changes its numbers. lambda_max asked for with lambda_min comes from
    their shared Lanczos run, which stops when both ends converge, so it differs (within
    tol) from lambda_max measured alone: the two live in different slots
    (``lambda_max@lambda_max+lambda_min`` and ``lambda_max@lambda_max``). Trace and
    Frobenius norm share their products; their numbers depend on which of them is asked
    for only through ``target_stderr``. Exact values (one dense spectrum) and the other
    measures depend on nothing but the settings.
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
    """The measures to compute so that every missing one gets the numbers the whole request would.

    These are the missing ones, with every asked-for member of a work group that has a
    missing one.
    """
    missing = set(wanted) - hits
    groups = {_WORK_GROUPS[m] for m in missing if m in _WORK_GROUPS}
    return tuple(m for m in config.measures if m in missing or any(m in g for g in groups))


def cache_key(
    config: SharpnessConfig,
    *,
    model: nn.Module,
    checkpoint: Path,
    dataset: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> str:
    """What decides a result besides the measure.

    The code, every setting but the list of measures, the exact data measured (sha256 of
    the inputs and labels after subsetting), the device, the model and the checkpoint's
    content (sha256).
    """
    settings = asdict(config)
    del settings["measures"]
    first = next(iter(model.parameters()), None)
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "flatcli": __version__,
            "torch": torch.__version__,
            "config": settings,
            "dataset": dataset,
            "data": tensor_digest(inputs, targets),
            "device": str(first.device) if first is not None else "cpu",
            "checkpoint": _sha256(checkpoint),
            "model": repr(model),
        },
        sort_keys=True,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Found:
    """What the cache holds of one request: the head (loss, accuracy, ...) and the slots found."""

    head: JSONObject
    layers: list[JSONObject]
    slots: dict[str, JSONObject]  # measure name -> {"result": ..., "layers": [...]}
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
    """``sharpness.json`` of one run: per measure results, keyed by :func:`cache_key` and :func:`measure_slot`.

    Layout: ``{"format": 3, "entries": {KEY: {"head": {...}, "layers": [...],
    "measures": {SLOT: {"result": {...}, "layers": [...]}}}}}``. Every write is a
    read-modify-write under an exclusive ``fcntl.flock`` of ``sharpness.json.lock`` and an
    atomic replace, so concurrent processes keep every entry and a killed one leaves the
    old file. A file that cannot be read, parsed or written, or that has the wrong shape,
    costs one warning (per instance) and is treated as empty, then replaced on the next write.
    """

    def __init__(self, path: Path) -> None:
        """A cache stored at ``path`` (created on the first write)."""
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._warned = False

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(text, stacklevel=3)

    def read(self) -> dict[str, JSONObject]:
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
        entries: dict[str, JSONObject] = doc["entries"]
        if not all(isinstance(v, dict) for v in entries.values()):
            return self._corrupt("an entry is not an object")
        if (
            doc.get("format") != CACHE_FORMAT
        ):  # written by an older flatcli: recomputed, then replaced
            return {}
        return entries

    def _corrupt(self, why: str) -> dict[str, JSONObject]:
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
        found: dict[str, JSONObject] = {}
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
        slots: dict[str, JSONObject] = {}
        for name in names:
            slot: JSONObject = {"result": doc[name]}
            if config.per_layer and name in PER_LAYER:
                slot["layers"] = [layer[name] for layer in doc.get("layers", [])]
            slots[measure_slot(name, config)] = slot
        head = {k: v for k, v in doc.items() if k not in report.measures and k not in _NOT_HEAD}
        layers = [
            {k: x[k] for k in ("name", "params", "num_params")} for x in doc.get("layers", [])
        ]
        return self.update(key, head, layers, slots)

    def update(
        self, key: str, head: JSONObject, layers: list[JSONObject], slots: dict[str, JSONObject]
    ) -> bool:
        """Locked read-modify-write of one entry: set its head and layers, add ``slots``."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            return self._cannot_write(exc)
        try:
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


def measure_cached(
    cache: ResultCache,
    key: str,
    config: SharpnessConfig,
    run: Callable[[SharpnessConfig], SharpnessReport],
    *,
    checkpoint: Path,
    dataset: str,
    use_cache: bool = True,
    start: float | None = None,
) -> SharpnessReport:
    """``run(config)``, computing only the measures that ``cache`` does not hold under ``key``.

    Measures found are not computed again (``report.cached`` names them), and the others
    are computed with every asked-for member of their work group, so that each gets the
    numbers of the whole request; the computed ones are stored. ``use_cache=False``
    recomputes every measure (and stores them). Under torchrun rank 0 alone reads and
    writes the cache and tells the other ranks what it found. ``start`` is the
    ``time.perf_counter()`` the request's ``seconds`` count from (default: now).

    Returns:
        The report of every measure asked for, in the order asked for.
    """
    start = time.perf_counter() if start is None else start
    wanted = {name: measure_slot(name, config) for name in _with_implied(config.measures)}
    found: _Found | None = broadcast_object(
        cache.lookup(key, wanted, config) if use_cache and is_main() else None
    )
    if found is not None and found.hits == set(wanted):  # all from the cache: no model evaluation
        report = found.report(checkpoint, dataset, config)
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
        found.report(checkpoint, dataset, config, only=found.hits),
        config,
        seconds=time.perf_counter() - start,
    )


def _merge(
    computed: SharpnessReport, cached: SharpnessReport, config: SharpnessConfig, *, seconds: float
) -> SharpnessReport:
    """One report, in the order asked for, of measures computed now and measures from the cache."""
    names: Sequence[str] = _with_implied(config.measures)
    measures = {
        m: computed.measures[m] if m in computed.measures else cached.measures[m] for m in names
    }
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
            for now, old in zip(computed.layers, cached.layers, strict=True)
        ]
        if config.per_layer
        else computed.layers
    )
    return replace(
        computed,
        measures=measures,
        layers=layers,
        seconds=seconds,
        cached=tuple(m for m in names if m not in computed.measures),
    )
