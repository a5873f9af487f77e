"""Data sets, as training and curvature see them.

Every data set is held as two tensors: images ``(N, C, H, W)`` in float32, already
normalised, and integer labels ``(N,)``. Holding tensors (not a DataLoader over PIL
images) keeps the Hessian's data pass a plain loop over slices and makes subsets,
order and normalisation exact and reproducible. Augmentation is applied only by the
training loop, batch by batch, through :func:`augment_batch`.

Registry (``DATASETS``):

========================  =========  ========  ===================================================
name                      shape      classes   normalisation
========================  =========  ========  ===================================================
``digits`` (default)      1 x 8 x 8  10        pixel / 16 (scikit-learn's 0..16 counts to [0, 1]);
                                               stratified 80/20 split, ``random_state=0``
``mnist``                 1 x 28x28  10        (x/255 - 0.1307) / 0.3081
``fashion-mnist``         1 x 28x28  10        (x/255 - 0.2860) / 0.3530
``cifar10``               3 x 32x32  10        per channel, mean (0.4914, 0.4822, 0.4465),
                                               std (0.2470, 0.2435, 0.2616)
``cifar100``              3 x 32x32  100       per channel, mean (0.5071, 0.4865, 0.4409),
                                               std (0.2673, 0.2564, 0.2762)
========================  =========  ========  ===================================================

``digits`` is scikit-learn's bundled copy of the UCI optical digits (1,797 images): no
download ever. The torchvision sets are read from ``data_dir`` (default
``$FLATCLI_DATA`` or ``~/.cache/flatcli/data``) in torchvision's own layout, and
downloaded only when asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from flatcli.errors import DataError, UnknownNameError

SPLITS = ("train", "test")

#: Seed of the fixed permutation that ``train_samples`` / ``samples`` subsets are cut from.
SUBSET_SEED = 0


#: Reads a data set: ``(train, data_dir, download) -> (images (N, C, H, W) in [0, 1], labels)``.
Reader = Callable[[bool, Path, bool], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DatasetSpec:
    """What flatcli knows about one data set."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalisation: str
    augment_by_default: bool
    read: Reader = field(repr=False)
    layout: str = ""

    def describe(self) -> dict[str, object]:
        """The JSON-able description a checkpoint records."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "normalisation": self.normalisation,
        }


def default_data_dir() -> Path:
    """``$FLATCLI_DATA`` if set, else ``$XDG_CACHE_HOME/flatcli/data`` (``~/.cache/...``)."""
    if env := os.environ.get("FLATCLI_DATA"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "flatcli" / "data"


def _read_digits(train: bool, data_dir: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    # lazy: scikit-learn takes seconds to import and only the digits data set needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    x, y = (x_train, y_train) if train else (x_test, y_test)
    return x[:, None, :, :], y


def _torchvision_reader(cls_name: str) -> Reader:
    def read(train: bool, data_dir: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
        import torchvision  # lazy: seconds to import, and only these data sets need it

        cls = getattr(torchvision.datasets, cls_name)
        try:
            ds = cls(root=str(data_dir), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found ..."
            raise _missing(cls_name, data_dir, download, exc) from None
        except OSError as exc:  # offline download, unreadable files
            raise _missing(cls_name, data_dir, download, exc) from None
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        targets = (
            ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else np.asarray(ds.targets)
        )
        if data.ndim == 3:  # MNIST-like: (N, H, W)
            data = data[:, None, :, :]
        else:  # CIFAR: (N, H, W, C)
            data = data.transpose(0, 3, 1, 2)
        return data.astype(np.float32) / 255.0, targets

    return read


def _missing(cls_name: str, data_dir: Path, download: bool, exc: Exception) -> DataError:
    name = {
        "MNIST": "mnist",
        "FashionMNIST": "fashion-mnist",
        "CIFAR10": "cifar10",
        "CIFAR100": "cifar100",
    }[cls_name]
    layout = DATASETS[name].layout.format(root=data_dir)
    if download:
        return DataError(
            f"could not download {name} into {data_dir}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            hint=f"check the network, or place the files by hand as {layout} and pass --data-dir",
        )
    return DataError(
        f"{name} not found in {data_dir}: expected {layout}",
        hint="pass --data-dir to where it is, or add --download to fetch it",
    )


def _spec(
    name: str,
    classes: int,
    shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: bool,
    read: Reader,
    layout: str,
) -> DatasetSpec:
    norm = f"(x/255 - mean) / std with mean={list(mean)} std={list(std)}"
    return DatasetSpec(name, classes, shape, mean, std, norm, augment, read, layout)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "digits",
        10,
        (1, 8, 8),
        (0.0,),
        (16.0,),
        "pixel / 16 (scikit-learn load_digits; stratified 80/20 split, random_state=0)",
        False,
        _read_digits,
        "bundled with scikit-learn",
    ),
    "mnist": _spec(
        "mnist",
        10,
        (1, 28, 28),
        (0.1307,),
        (0.3081,),
        False,
        _torchvision_reader("MNIST"),
        "{root}/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
    ),
    "fashion-mnist": _spec(
        "fashion-mnist",
        10,
        (1, 28, 28),
        (0.2860,),
        (0.3530,),
        False,
        _torchvision_reader("FashionMNIST"),
        "{root}/FashionMNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
    ),
    "cifar10": _spec(
        "cifar10",
        10,
        (3, 32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
        _torchvision_reader("CIFAR10"),
        "{root}/cifar-10-batches-py/",
    ),
    "cifar100": _spec(
        "cifar100",
        100,
        (3, 32, 32),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        True,
        _torchvision_reader("CIFAR100"),
        "{root}/cifar-100-python/",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``, or an :class:`UnknownNameError` listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown data set {name!r}", hint=f"choose one of: {', '.join(DATASETS)}"
        ) from None


def load_dataset(
    name: str = "digits",
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    samples: int | None = None,
) -> TensorDataset:
    """Load ``name``'s ``split`` as a :class:`TensorDataset` of (normalised images, labels).

    This is exactly what training (before augmentation) and every curvature measure see.
    ``samples`` keeps a deterministic subset: the first ``samples`` indices of a fixed
    permutation (seed :data:`SUBSET_SEED`), returned in ascending index order.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", hint="use 'train' or 'test'")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    images, labels = spec.read(split == "train", root, download)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    x = (x - mean) / std
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if samples is not None:
        idx = subset_indices(len(y), samples)
        x, y = x[idx], y[idx]
    return TensorDataset(x.contiguous(), y.contiguous())


def subset_indices(n: int, samples: int) -> torch.Tensor:
    """Sorted indices of a deterministic subset of size ``samples`` out of ``n``."""
    if samples <= 0:
        raise DataError(f"the number of samples must be positive, got {samples}")
    if samples > n:
        raise DataError(f"asked for {samples} samples but the split has only {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))
    return perm[:samples].sort().values


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, part: tuple[int, slice] | None = None
) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, per image, on a batch.

    The standard CIFAR augmentation (He et al. 2016), done on tensors on the batch's own
    device; the random numbers come from ``generator`` (on the CPU) so a run is
    reproducible and resumable. ``part=(total, rows)``: ``x`` is rows ``rows`` of a batch
    of ``total`` images; the draws are those of the whole batch and these rows get
    theirs, so N data-parallel processes augment their parts exactly as one process
    augments the batch, and every rank's generator stays in step.
    """
    n, _, h, w = x.shape
    total, rows_of = part if part is not None else (n, slice(0, n))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (total,), generator=generator)[rows_of].to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (total,), generator=generator)[rows_of].to(x.device)
    flip = (torch.rand(total, generator=generator) < 0.5)[rows_of].to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1)  # (n, h)
    cols = torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1)  # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
