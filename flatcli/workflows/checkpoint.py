"""Checkpoints: safetensors files with one JSON metadata document.

A flatcli checkpoint is a ``.safetensors`` file holding a model's state dict
(parameters and buffers) and one metadata key, ``flatcli``, whose value is a JSON
document::

    {"format_version": 1,
     "arch": {"name": "mlp", "kwargs": {...}},
     "dataset": {"name", "num_classes", "input_shape", "normalisation"},
     "train": {every option, seed, torch and flatcli versions},
     "provenance": {device, versions, command, time, git commit},
     "metrics": {final metrics}}

``provenance`` (:mod:`flatcli.workflows.provenance`) is absent from checkpoints written
before it was recorded; they load all the same.

No pickles: the file can be read by any safetensors reader.

Weights from elsewhere load too (:func:`read_weights`): a safetensors file without
flatcli metadata, a ``torch.save`` state dict (``.pt``, ``.pth``, ``.bin``) or a
Lightning ``.ckpt``, read with ``torch.load(weights_only=True)``, which rebuilds tensors
and plain containers only and refuses any other class: unpickling a class runs code named
by the file, so a file that needs it is refused, never executed. Their architecture comes
from a model factory (:mod:`flatcli.models.factory`).

Every write goes to a temporary file in the same folder and is then renamed over the
target (:func:`os.replace` is atomic on POSIX and Windows), so a crash never leaves half
a checkpoint. The resumable training state is stored the same way, with nested optimiser
state flattened into named tensors plus a JSON skeleton (:func:`save_state`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from flatcli.errors import CheckpointError, FlatcliError, UsageError, few, first_line
from flatcli.models import build_model
from flatcli.models.factory import LogitsOf, ModelFactory, resolve_factory

#: A JSON document as ``json.loads`` gives it: checkpoint metadata, a resume state's skeleton.
Document = dict[str, Any]
#: A resumable training state: nested dicts and lists of tensors and JSON values.
State = dict[str, Any]

FORMAT_VERSION = 1
METADATA_KEY = "flatcli"
MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
STATE_FILE = "resume.safetensors"
METRICS_FILE = "metrics.jsonl"
#: The same per-epoch rows as :data:`METRICS_FILE`, as CSV with one header line.
METRICS_CSV_FILE = "metrics.csv"
CACHE_FILE = "sharpness.json"
#: Held (``fcntl.flock``) by the process that trains into a run folder.
LOCK_FILE = ".flatcli.lock"
#: Files read with ``torch.load(weights_only=True)`` (also any file that starts as one:
#: a zip archive or a pickle).
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: Keys under which checkpoints keep the state dict: Lightning, the common training-loop
#: layouts; tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
#: Key prefixes added by wrappers: DataParallel / DistributedDataParallel, a Lightning
#: module's attribute, ``torch.compile``.
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")
#: Where ``train --overwrite`` writes the new run until it replaces the old one.
STAGING_DIR = ".flatcli-staging"
#: The files a run folder may hold; ``--overwrite`` replaces these and nothing else.
RUN_FILES = (MODEL_FILE, LAST_FILE, METRICS_FILE, METRICS_CSV_FILE, STATE_FILE, CACHE_FILE)
#: The files training writes (and only the process holding the run's lock writes).
TRAIN_FILES = (MODEL_FILE, LAST_FILE, METRICS_FILE, METRICS_CSV_FILE, STATE_FILE)


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata of a loaded checkpoint and where it came from."""

    path: Path
    arch: Document
    dataset: Document
    train: Document = field(default_factory=dict)
    metrics: Document = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: What the checkpoint was made with (:mod:`flatcli.workflows.provenance`); None in
    #: checkpoints written before it was recorded.
    provenance: Document | None = None

    @property
    def run_dir(self) -> Path | None:
        """The run directory, when the checkpoint is a run's ``model.safetensors``."""
        return self.path.parent if self.path.name == MODEL_FILE else None

    def as_dict(self) -> Document:
        """The metadata document, as the checkpoint stores it."""
        doc: Document = {
            "format_version": self.format_version,
            "arch": self.arch,
            "dataset": self.dataset,
            "train": self.train,
            "metrics": self.metrics,
        }
        if self.provenance is not None:
            doc["provenance"] = self.provenance
        return doc


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    ``mkstemp`` creates the temporary with mode 0600; it is given the mode a plain
    ``open`` would (0666 less the umask) before the rename. A process killed between
    the two leaves ``.NAME.*.tmp``, which :func:`remove_temporaries` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(Path(tmp))
        except (
            SafetensorError
        ) as exc:  # safetensors reports a full disk as "I/O error: ... (os error 28)"
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_run_file(name: str) -> bool:
    """Whether a name in a run folder is flatcli's own: a run file, a lock, a temporary, the staging folder."""
    if name in RUN_FILES or name in (LOCK_FILE, STAGING_DIR):
        return True
    bare = name[1:] if name.startswith(".") else name
    if bare.endswith(".lock"):  # e.g. sharpness.json.lock, .sharpness.json.lock, .sharpness.lock
        stem = bare[: -len(".lock")]
        return stem in RUN_FILES or stem in {Path(f).stem for f in RUN_FILES}
    return (
        name.startswith(".")
        and name.endswith(".tmp")
        and any(bare.startswith(f"{f}.") for f in (*RUN_FILES, LOCK_FILE.lstrip(".")))
    )


def remove_temporaries(folder: Path, names: tuple[str, ...] = TRAIN_FILES) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` left by :func:`atomic_write` for each ``NAME``; return them.

    Only the writer of ``NAME`` may call this (a temporary of a live writer would go).
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: give it clean copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, metadata: Document) -> Path:
    """Write ``model``'s state dict and ``metadata`` atomically to ``path``."""
    doc = {"format_version": FORMAT_VERSION, **metadata}
    tensors = _tensors_of(model)
    path = Path(path)
    atomic_write(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(doc)})
    )
    return path


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run directory's ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return p / MODEL_FILE
        hint = (
            "the run is unfinished: continue it with flatcli train --resume"
            if (p / STATE_FILE).exists()
            else (f"pass a .safetensors file or a run directory containing {MODEL_FILE}")
        )
        raise CheckpointError(f"{p} holds no checkpoint ({MODEL_FILE} is missing)", hint=hint)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def read_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Document | None]:
    """The tensors and the flatcli metadata document (None when absent) of a safetensors file."""
    p = Path(path)
    try:
        tensors = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{p} is not a readable safetensors file ({first_line(exc)})", hint="is it truncated?"
        ) from None
    if METADATA_KEY not in meta:
        return tensors, None
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{p} has corrupt flatcli metadata") from None
    return tensors, doc


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_factory: ModelFactory | None = None,
    factory_args: Mapping[str, object] | None = None,
    output: str | int | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint (file or run directory) as ``(model in eval mode, info)``.

    Files without flatcli metadata (see :func:`read_weights` for the forms) need
    ``model_factory``: a ``MODULE:FUNCTION`` / ``FILE.py:FUNCTION`` spec or a callable,
    called with ``factory_args`` as keyword arguments (:mod:`flatcli.models.factory`). The
    tensors must then match that module's state dict exactly, once a wrapper's key prefix
    is stripped (:func:`match_keys`). The weights are loaded into the factory's model,
    which is then wrapped in :class:`~flatcli.models.factory.LogitsOf` (same parameter names),
    so that its forward returns the logits whatever it returned (``output`` picks them;
    see :func:`~flatcli.models.factory.pick_logits`). What loading did to the keys is said by a
    :class:`CheckpointNote` warning; NaN or Inf weights load, with a
    :class:`RuntimeWarning`.
    """
    factory = resolve_factory(model_factory, factory_args)
    if output is not None and factory is None:
        raise UsageError(
            "--output applies to a model built by --model-factory (flatcli's own models return logits)"
        )
    p = resolve_checkpoint_path(path)
    tensors, doc, notes = read_weights(p)
    if factory is not None:
        info = checkpoint_info(p, doc or {}, need_arch=False)
        model = factory()
    else:
        if doc is None:
            raise CheckpointError(
                f"{p} has no flatcli metadata, so its architecture is unknown",
                hint="pass --model-factory MODULE:FUNCTION or FILE.py:FUNCTION that builds the model, and --dataset; "
                "in Python model_factory=... and dataset=...",
            )
        info = checkpoint_info(p, doc)
        ds = info.dataset
        try:
            model = build_model(
                info.arch["name"],
                input_shape=tuple(ds["input_shape"]),
                num_classes=ds["num_classes"],
                **info.arch["kwargs"],
            )
        except FlatcliError as exc:  # a bad value in the file is the file's fault, not an option's
            raise CheckpointError(f"{p} metadata describes no buildable model: {exc}") from None
    tensors, stripped = match_keys(tensors, model.state_dict())
    load_state(model, tensors, f"{p} (keys stripped of {stripped!r})" if stripped else p)
    if stripped:
        notes.append(f"stripped the prefix {stripped!r} from {len(tensors)} keys")
    for note in notes:
        warnings.warn(f"{p.name}: {note}", CheckpointNote, stacklevel=2)
    if factory is not None:
        model = LogitsOf(model, output)
    model.to(map_location).eval()
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        warnings.warn(
            f"{p}: non-finite values (NaN/Inf) in {', '.join(bad[:5])}",
            RuntimeWarning,
            stacklevel=2,
        )
    return model, info


class CheckpointNote(UserWarning):
    """What loading did to a file from elsewhere: the wrapper key read, the prefix stripped."""


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Document | None, list[str]]:
    """The tensors, the flatcli metadata (None when absent) and notes on how they were found.

    A file named ``*.pt``, ``*.pth``, ``*.bin`` or ``*.ckpt``, or starting as a zip
    archive or a pickle, is read with ``torch.load(map_location="cpu",
    weights_only=True)``; any other as safetensors. A torch file may hold the state
    dict itself or keep it under ``state_dict`` (Lightning), ``model_state_dict`` or
    ``model`` (:data:`WRAPPER_KEYS`, followed up to three levels); entries that are not
    tensors (an epoch, hyper-parameters) are left out.
    """
    p = Path(path)
    if not _is_torch_file(p):
        tensors, doc = read_metadata(p)
        return tensors, doc, []
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" ({found[1]})" if found else ""
            raise CheckpointError(
                f"{p} needs code to be unpickled{what}; flatcli reads only tensors (torch.load weights_only=True) "
                "and never runs code from a file",
                hint="save the weights alone: torch.save(model.state_dict(), PATH) or safetensors",
            ) from None
        raise CheckpointError(f"{p} is not a readable torch file ({first_line(exc)})") from None
    except (
        Exception
    ) as exc:  # a corrupt or truncated archive: whatever torch raises, the file is at fault
        raise CheckpointError(
            f"{p} is not a readable torch file ({type(exc).__name__}: {first_line(exc)})",
            hint="is it truncated?",
        ) from None
    tensors, notes = _state_dict_in(obj, p)
    return tensors, None, notes


def _is_torch_file(p: Path) -> bool:
    """By the name, else by the first bytes: torch.save's zip archive, or its legacy format
    (pickle protocol 2 and a 10-byte magic number; as a safetensors header length that
    would be 176 MB, beyond what safetensors allows).
    """
    suffix = p.suffix.lower()
    if suffix in (".safetensors", *TORCH_SUFFIXES):
        return suffix != ".safetensors"
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"PK\x03\x04", b"\x80\x02\x8a\x0a")


def _state_dict_in(obj: Any, p: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in what ``torch.load`` returned, and where it was found."""
    notes = []
    for _ in range(3):
        if not isinstance(obj, Mapping) or (
            obj and all(isinstance(v, torch.Tensor) for v in obj.values())
        ):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        lightning = key == "state_dict" and any(
            k in obj for k in ("pytorch-lightning_version", "epoch", "global_step")
        )
        notes.append(
            f"read the state dict under {key!r}"
            + (" (a Lightning checkpoint)" if lightning else "")
        )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{p} holds a {type(obj).__name__}, not a state dict",
            hint="save one with torch.save(model.state_dict(), PATH)",
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        raise CheckpointError(
            f"{p} holds no tensors (keys: {keys})",
            hint=f"expected a state dict, or a dict with one under {', '.join(map(repr, WRAPPER_KEYS))}",
        )
    others = [str(k) for k in obj if k not in tensors]
    if others:
        notes.append(f"left out {len(others)} entries that are not tensors ({few(others)})")
    return tensors, notes


def match_keys(
    tensors: dict[str, torch.Tensor], expected: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], str]:
    """``tensors`` with the key prefix of a wrapper stripped, and the prefix stripped ("" for none).

    A prefix of :data:`KEY_PREFIXES` is stripped only when every key has it, repeatedly
    (``module._orig_mod.`` is DDP around ``torch.compile``), and the result is used only
    when its keys are exactly those of ``expected`` (the model's state dict). When no
    version matches, the one sharing the most keys with the model is returned, for
    :func:`load_state` to name the differences.
    """
    want = set(expected)
    candidates = [(tensors, "")]
    current, stripped = tensors, ""
    while set(current) != want:
        prefix = next(
            (q for q in KEY_PREFIXES if current and all(k.startswith(q) for k in current)), None
        )
        if prefix is None:
            break
        current, stripped = {k[len(prefix) :]: v for k, v in current.items()}, stripped + prefix
        candidates.append((current, stripped))
    if set(current) == want:
        return current, stripped
    return max(candidates, key=lambda c: len(set(c[0]) & want))


def checkpoint_info(p: Path, doc: Any, need_arch: bool = True) -> CheckpointInfo:
    """The metadata document ``doc`` of ``p`` checked for JSON types, as a :class:`CheckpointInfo`.

    Every field a command reads later is checked here, so that a hand-edited or foreign
    file is one :class:`CheckpointError`, not a TypeError deep inside a measure.
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{p} has malformed flatcli metadata: {what}")

    if not isinstance(doc, dict):
        raise bad(f"a JSON {_json_type(doc)} where an object is expected")
    version = doc.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        raise bad(f"format_version is {version!r}, not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} was written by a newer flatcli (checkpoint format {version}; this flatcli "
            f"reads up to {FORMAT_VERSION})",
            hint="upgrade flatcli: pip install -U flatcli",
        )
    for key in ("arch", "dataset", "train", "metrics", "provenance"):
        if key in doc and not isinstance(doc[key], dict):
            raise bad(f"{key} is a JSON {_json_type(doc[key])}, not an object")
    if need_arch:
        for key in ("arch", "dataset"):
            if key not in doc:
                raise CheckpointError(f"{p} metadata lacks {key!r}")
    arch = doc.get("arch", {"name": "custom", "kwargs": {}})
    if need_arch or "arch" in doc:
        if not isinstance(arch.get("name"), str):
            raise bad(f"arch.name is {arch.get('name')!r}, not a model name")
        if not isinstance(arch.setdefault("kwargs", {}), dict):
            raise bad(f"arch.kwargs is a JSON {_json_type(arch['kwargs'])}, not an object")
    dataset = doc.get("dataset", {})
    if need_arch or "input_shape" in dataset:
        shape = dataset.get("input_shape")
        if not (isinstance(shape, list) and shape and all(_is_int(s) and s > 0 for s in shape)):
            raise bad(f"dataset.input_shape is {shape!r}, not a list of positive integers")
    if need_arch or "num_classes" in dataset:
        classes = dataset.get("num_classes")
        if not (_is_int(classes) and classes >= 2):
            raise bad(f"dataset.num_classes is {classes!r}, not an integer >= 2")
    if "name" in dataset and not isinstance(dataset["name"], str):
        raise bad(f"dataset.name is {dataset['name']!r}, not a data set name")
    train = doc.get("train", {})
    for key in ("l2", "weight_decay", "lr", "momentum"):
        value = train.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise bad(f"train.{key} is {value!r}, not a number >= 0")
    for key, value in doc.get("metrics", {}).items():
        if value is not None and not _is_number(value):
            raise bad(f"metrics.{key} is {value!r}, not a number")
    return CheckpointInfo(
        p, arch, dataset, train, doc.get("metrics", {}), version, doc.get("provenance")
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], origin: Path | str) -> None:
    """Load ``tensors`` into ``model``, naming missing, unexpected, mis-shaped and mis-typed keys.

    A tensor's dtype may differ in precision (it is cast, as ``load_state_dict`` does)
    but not in kind: integer values where the model holds floating-point ones (or the
    reverse, e.g. BatchNorm's int64 ``num_batches_tracked``) mean the file is not this
    model's, and a cast would silently truncate.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    kinds = [
        f"{k} {str(tensors[k].dtype).removeprefix('torch.')} vs {str(v.dtype).removeprefix('torch.')}"
        for k, v in expected.items()
        if k in tensors and _kind(tensors[k].dtype) != _kind(v.dtype)
    ]
    if missing or unexpected or shapes or kinds:
        parts = []
        if missing:
            parts.append(f"missing {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {few(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {few(shapes)}")
        if kinds:
            parts.append(f"wrong dtype {few(kinds)}")
        raise CheckpointError(
            f"{origin}: tensors do not match the architecture: {'; '.join(parts)}"
        )
    model.load_state_dict(tensors)


def _kind(dtype: torch.dtype) -> str:
    return (
        "complex"
        if dtype.is_complex
        else "float"
        if dtype.is_floating_point
        else "bool"
        if dtype == torch.bool
        else "integer"
    )


# --- resumable training state -------------------------------------------------------


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into ``out``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        out[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.k{i}", out), _flatten(v, f"{prefix}.{i}", out)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        return {
            "__list__": [_flatten(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)],
            "tuple": isinstance(obj, tuple),
        }
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return None if tensors is None else tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def save_state(path: str | os.PathLike[str], state: State) -> None:
    """Atomically save a nested dict of tensors and JSON values (e.g. optimiser state)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    atomic_write(
        Path(path),
        lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(skeleton)}),
    )


def load_state_file(path: str | os.PathLike[str], tensors: bool = True) -> State:
    """Inverse of :func:`save_state`; with ``tensors=False`` only the JSON part (tensors are None)."""
    if tensors:
        data, skeleton = read_metadata(path)
    else:
        data, skeleton = None, _read_skeleton(Path(path))
    if skeleton is None:
        raise CheckpointError(f"{path} is not a flatcli training state")
    try:
        state = _unflatten(skeleton, data)
    except (KeyError, TypeError, ValueError, AttributeError):
        state = None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a flatcli training state (its metadata is malformed)")
    return state


def _read_skeleton(p: Path) -> Any:
    """The JSON skeleton of a saved state (None when absent), without reading its tensors."""
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{p} is not a readable safetensors file ({first_line(exc)})"
        ) from None
