"""Checkpoints: safetensors files with one JSON metadata document.

A flatcli checkpoint is a ``.safetensors`` file holding a model's state dict
(parameters and buffers) and one metadata key, ``flatcli``, whose value is a JSON
document::

    {"format_version": 1,
     "arch": {"name": "mlp", "kwargs": {...}},
     "dataset": {"name", "num_classes", "input_shape", "normalisation"},
     "train": {every option, seed, torch and flatcli versions},
     "metrics": {final metrics}}

No pickles: the file can be read by any safetensors reader. Every write goes to a
temporary file in the same folder and is then renamed over the target
(:func:`os.replace` is atomic on POSIX and Windows), so a crash never leaves half a
checkpoint. The resumable training state is stored the same way, with nested optimiser
state flattened into named tensors plus a JSON skeleton (:func:`save_state`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

FORMAT_VERSION = 1
METADATA_KEY = "flatcli"
MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
STATE_FILE = "resume.safetensors"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata of a loaded checkpoint and where it came from."""

    path: Path
    arch: dict
    dataset: dict
    train: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def run_dir(self) -> Path | None:
        """The run directory, when the checkpoint is a run's ``model.safetensors``."""
        return self.path.parent if self.path.name == MODEL_FILE else None

    def as_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "arch": self.arch,
            "dataset": self.dataset,
            "train": self.train,
            "metrics": self.metrics,
        }


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: give it clean copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: dict) -> Path:
    """Write ``model``'s state dict and ``metadata`` atomically to ``path``."""
    doc = {"format_version": FORMAT_VERSION, **metadata}
    tensors = _tensors_of(model)
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(doc)}))
    return path


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return p / MODEL_FILE
        hint = "the run is unfinished: continue it with flatcli train --resume" if (p / STATE_FILE).exists() else (
            f"pass a .safetensors file or a run directory containing {MODEL_FILE}")
        raise CheckpointError(f"{p} holds no checkpoint ({MODEL_FILE} is missing)", hint=hint)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def read_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors and the flatcli metadata document (None when absent) of a safetensors file."""
    p = Path(path)
    try:
        tensors = load_file(str(p))
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is not a readable safetensors file ({_first_line(exc)})",
                              hint="is it truncated, or saved with torch.save? flatcli reads safetensors only") from None
    if METADATA_KEY not in meta:
        return tensors, None
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{p} has corrupt flatcli metadata") from None
    return tensors, doc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model_factory: Callable[[], nn.Module] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint (file or run directory) as ``(model in eval mode, info)``.

    Files without flatcli metadata (a plain safetensors state dict) need
    ``model_factory``, a zero-argument callable that builds the ``nn.Module``; the
    tensors must then match that module's state dict exactly. NaN or Inf weights load,
    with a :class:`RuntimeWarning`.
    """
    from .models import build_model

    p = resolve_checkpoint_path(path)
    tensors, doc = read_metadata(p)
    if model_factory is not None:
        model = model_factory()
        doc = doc or {}
        info = CheckpointInfo(p, doc.get("arch", {"name": "custom", "kwargs": {}}), doc.get("dataset", {}),
                              doc.get("train", {}), doc.get("metrics", {}), doc.get("format_version", FORMAT_VERSION))
    else:
        if doc is None:
            raise CheckpointError(
                f"{p} has no flatcli metadata, so its architecture is unknown",
                hint="pass --model-factory MODULE:FUNCTION (Python: model_factory=...) that builds the model",
            )
        try:
            info = CheckpointInfo(p, doc["arch"], doc["dataset"], doc.get("train", {}), doc.get("metrics", {}),
                                  doc.get("format_version", FORMAT_VERSION))
            ds = info.dataset
            model = build_model(info.arch["name"], input_shape=tuple(ds["input_shape"]),
                                num_classes=int(ds["num_classes"]), **info.arch.get("kwargs", {}))
        except KeyError as exc:
            raise CheckpointError(f"{p} metadata lacks {exc}") from None
    load_state(model, tensors, p)
    model.to(map_location).eval()
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        warnings.warn(f"{p}: non-finite values (NaN/Inf) in {', '.join(bad[:5])}", RuntimeWarning, stacklevel=2)
    return model, info


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], origin: Path | str) -> None:
    """Load ``tensors`` into ``model``, naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {_few(shapes)}")
        raise CheckpointError(f"{origin}: tensors do not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(tensors)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# --- resumable training state -------------------------------------------------------

def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into ``out``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        out[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", out), _flatten(v, f"{prefix}.{i}", out)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Atomically save a nested dict of tensors and JSON values (e.g. optimiser state)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp),
                                                    metadata={METADATA_KEY: json.dumps(skeleton)}))


def load_state_file(path: str | os.PathLike) -> dict:
    """Inverse of :func:`save_state`."""
    tensors, skeleton = read_metadata(path)
    if skeleton is None:
        raise CheckpointError(f"{path} is not a flatcli training state")
    return _unflatten(skeleton, tensors)
