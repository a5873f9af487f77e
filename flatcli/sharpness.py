"""Sharpness of a saved model: load a checkpoint and its data, measure, cache.

:func:`sharpness` is what ``flatcli sharpness`` and ``flatcli compare`` call. A run
directory keeps its results in ``sharpness.json``, keyed by the settings, the data and
the checkpoint's content hash, so that a second request with the same settings (say from
``compare``) costs nothing; ``use_cache=False`` recomputes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checkpoint import CheckpointInfo, atomic_write_text, load_checkpoint, resolve_checkpoint_path
from .data import load_dataset
from .errors import CheckpointError, DataError
from .measures import SharpnessConfig, SharpnessReport, file_digest, measure
from .training import resolve_device

CACHE_FILE = "sharpness.json"


@dataclass(frozen=True)
class MeasuredPoint:
    """A model in eval mode on its device, with the data it is measured on."""

    model: nn.Module
    info: CheckpointInfo
    inputs: torch.Tensor
    targets: torch.Tensor
    dataset: str


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """``MODULE:FUNCTION`` (module importable or a path to a .py file) -> the function."""
    if ":" not in spec:
        raise CheckpointError(f"--model-factory {spec!r} is not MODULE:FUNCTION")
    module_name, func_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            import importlib.util

            path = Path(module_name)
            if not path.is_file():
                raise CheckpointError(f"--model-factory: no file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except CheckpointError:
        raise
    except Exception as exc:  # any import failure of user code is the user's to fix
        raise CheckpointError(f"--model-factory: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise CheckpointError(f"--model-factory: {module_name} has no function {func_name}")

    def build() -> nn.Module:
        try:
            model = func()
        except Exception as exc:
            raise CheckpointError(f"--model-factory {spec} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"--model-factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


def load_point(path: str | os.PathLike, *, split: str = "train", samples: int | None = None,
               dataset: str | None = None, data_dir: str | None = None, device: str = "auto",
               model_factory: str | Callable[[], nn.Module] | None = None, download: bool = False) -> MeasuredPoint:
    """Load a checkpoint and the (unaugmented) data it is to be measured on."""
    factory = import_factory(model_factory) if isinstance(model_factory, str) else model_factory
    model, info = load_checkpoint(path, model_factory=factory)
    name = dataset or info.dataset.get("name")
    if not name:
        raise DataError("the checkpoint does not say which data set it was trained on", hint="pass --dataset")
    data = load_dataset(name, split, data_dir, download=download, samples=samples)
    x, y = data.tensors
    model = model.to(resolve_device(device))
    return MeasuredPoint(model, info, x, y, name)


def sharpness(path: str | os.PathLike, config: SharpnessConfig | None = None, *, dataset: str | None = None,
              data_dir: str | None = None, device: str = "auto",
              model_factory: str | Callable[[], nn.Module] | None = None, use_cache: bool = True,
              progress: Callable[[int], None] | None = None,
              status: Callable[[str], None] | None = None) -> SharpnessReport:
    """Measure the curvature of a checkpoint (file or run directory); see ``measures``."""
    config = config or SharpnessConfig()
    ckpt = resolve_checkpoint_path(path)
    point = load_point(ckpt, split=config.split, samples=config.samples, dataset=dataset, data_dir=data_dir,
                       device=device, model_factory=model_factory)
    cache = ckpt.parent / CACHE_FILE if ckpt.name == "model.safetensors" else None
    # The version is part of the key: a release may change an estimator (0.2.0: block Krylov
    # Hutch++), and a cached result must come from the code that would compute it now.
    key = json.dumps({"flatcli": __version__, "config": json.loads(config.key()), "dataset": point.dataset,
                      "device": str(
        next(point.model.parameters()).device), "checkpoint": file_digest(ckpt)}, sort_keys=True)
    if use_cache and cache is not None:
        hit = _read_cache(cache).get(key)
        if hit is not None:
            return SharpnessReport.from_dict(hit)
    l2 = float(point.info.train.get("l2", 0.0) or 0.0)
    report = measure(point.model, point.inputs, point.targets, config, l2=l2, progress=progress, status=status,
                     checkpoint=str(ckpt), dataset=point.dataset)
    if cache is not None:
        entries = _read_cache(cache)
        entries[key] = report.as_dict()
        atomic_write_text(cache, json.dumps({"entries": entries}))
    return report


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("entries", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
