"""Data sets: the embedded digits split, subsets, augmentation, missing-data errors."""

import numpy as np
import pytest
import torch

from flatcli import load_dataset
from flatcli.errors import DataError, UnknownNameError
from flatcli.workflows.data import DATASETS, augment_batch, subset_indices


def test_digits_split_is_stratified_80_20_and_scaled_to_unit_interval():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    x, y = train.tensors
    assert x.shape == (1437, 1, 8, 8) and len(test) == 360
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # stratified: every class has about 80% of its images in train
    counts = torch.bincount(y, minlength=10).float() / (
        torch.bincount(y, minlength=10) + torch.bincount(test.tensors[1], minlength=10)
    )
    assert torch.allclose(counts, torch.full((10,), 0.8), atol=0.01)


def test_digits_is_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])


def test_subset_is_deterministic_sorted_and_a_subset():
    full = load_dataset("digits")
    sub = load_dataset("digits", samples=100)
    idx = subset_indices(len(full), 100)
    assert len(sub) == 100 and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(sub.tensors[0], full.tensors[0][idx])


@pytest.mark.parametrize("samples", [0, 10_000])
def test_bad_subset_sizes_are_refused(samples):
    with pytest.raises(DataError):
        load_dataset("digits", samples=samples)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="digits, mnist"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_missing_torchvision_data_names_layout_and_options(name, tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(name, data_dir=tmp_path / "empty")
    text = str(info.value)
    assert str(tmp_path / "empty") in text and "--data-dir" in text and "--download" in text


def test_torchvision_reader_reads_the_real_layout(tmp_path):
    # Write a tiny MNIST in torchvision's raw IDX layout and read it back.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0, 0, 8, 3], dtype=np.uint8).tobytes()
            + np.array([n, 28, 28], dtype=">i4").tobytes()
            + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0, 0, 8, 1], dtype=np.uint8).tobytes()
            + np.array([n], dtype=">i4").tobytes()
            + labels.tobytes()
        )
    ds = load_dataset("mnist", "train", data_dir=tmp_path)
    x, y = ds.tensors
    assert x.shape == (6, 1, 28, 28)
    spec = DATASETS["mnist"]
    assert torch.allclose(x * spec.std[0] + spec.mean[0], x * 0.3081 + 0.1307)
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert len(load_dataset("mnist", "test", data_dir=tmp_path)) == 4


def test_augmentation_crops_and_flips_reproducibly():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    a = augment_batch(x, torch.Generator().manual_seed(1), pad=2)
    b = augment_batch(x, torch.Generator().manual_seed(1), pad=2)
    assert torch.equal(a, b) and a.shape == x.shape
    # with no padding the only change is a flip: each image is itself or its mirror
    c = augment_batch(x, torch.Generator().manual_seed(3), pad=0)
    for i in range(2):
        assert torch.equal(c[i], x[i]) or torch.equal(c[i], x[i].flip(-1))
