"""Shared fixtures: tiny, fast problems built from the embedded digits data."""

from __future__ import annotations

import pytest
import torch

from flatcli.config import make_train_config
from flatcli.workflows import training

# The suite's problems are small: one thread is as fast, and immune to the 10-100x
# slow-downs of OpenMP spin-waits when another process holds the machine's other core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    # Never touch the user's cache, never depend on the working directory.
    monkeypatch.setenv("FLATCLI_DATA", str(tmp_path / "data-cache"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@pytest.fixture
def make_config():
    def make(**kw):
        base = dict(dataset="digits", model="logreg", epochs=2, batch_size=64, device="cpu")
        base.update(kw)
        return make_train_config(**base)

    return make


@pytest.fixture
def fixed_provenance(monkeypatch):
    """The provenance record (time, command line) is the one part of a checkpoint that differs
    between two identical runs: fixed here, so that everything else is compared byte for byte."""
    record = training.provenance("cpu")
    monkeypatch.setattr(training, "provenance", lambda device: record)
    return record
