"""Checkpoints: round trip, metadata, and every way a file can be wrong."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flatcli
import flatcli.workflows.checkpoint as ckpt
from flatcli import build_model, load_checkpoint, save_checkpoint, train
from flatcli.errors import CheckpointError
from flatcli.workflows.checkpoint import read_metadata


@pytest.fixture
def run(make_config):
    return train(
        make_config(
            out=Path("run"), model="mlp", model_kwargs={"width": 8}, l2=1e-3, weight_decay=2e-3
        )
    )


def test_round_trip_rebuilds_the_model_and_its_metadata(run):
    model, info = load_checkpoint("run")  # a run directory works as well as the file
    assert not model.training
    assert info.arch == {"name": "mlp", "kwargs": {"width": 8, "depth": 1}}
    assert info.dataset["name"] == "digits" and info.dataset["input_shape"] == [1, 8, 8]
    assert info.train["l2"] == 1e-3 and info.train["weight_decay"] == 2e-3
    assert info.train["torch_version"] == torch.__version__
    assert info.train["flatcli_version"] == flatcli.__version__
    assert info.metrics["test_accuracy"] == run.metrics["test_accuracy"]
    raw = load_file("run/model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k])


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "empty")


def test_truncated_and_foreign_files_are_refused(run, tmp_path):
    data = Path("run/model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    torch.save(
        {"w": torch.zeros(2)}, tmp_path / "pickle.pt"
    )  # a torch state dict: read, but no architecture
    with pytest.raises(CheckpointError, match="no flatcli metadata.*--model-factory"):
        load_checkpoint(tmp_path / "pickle.pt")
    data = (tmp_path / "pickle.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_checkpoint(tmp_path / "cut.pt", model_factory=lambda: torch.nn.Linear(2, 1))


def test_plain_state_dict_needs_a_model_factory(tmp_path):
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "plain.safetensors"),
    )
    with pytest.raises(CheckpointError, match="--model-factory"):
        load_checkpoint(tmp_path / "plain.safetensors")
    loaded, info = load_checkpoint(
        tmp_path / "plain.safetensors",
        model_factory=lambda: build_model("logreg", input_shape=(1, 8, 8), num_classes=10),
    )
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_tensors_that_do_not_match_the_architecture_are_named(run, tmp_path):
    tensors, doc = read_metadata("run/model.safetensors")
    doc["arch"]["kwargs"]["width"] = 9
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"flatcli": json.dumps(doc)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(bad)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(bad), metadata={"flatcli": json.dumps(doc)})
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(bad)


def test_non_finite_weights_load_with_a_warning(tmp_path):
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    meta = {
        "arch": {"name": "logreg", "kwargs": {}},
        "dataset": {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]},
    }
    save_checkpoint(tmp_path / "nan.safetensors", model, meta)
    with pytest.warns(RuntimeWarning, match="NaN"):
        load_checkpoint(tmp_path / "nan.safetensors")


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    meta = {
        "arch": {"name": "logreg", "kwargs": {}},
        "dataset": {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]},
    }
    target = tmp_path / "m.safetensors"
    save_checkpoint(target, model, meta)
    before = target.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(target, build_model("logreg", input_shape=(1, 8, 8), num_classes=10), meta)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_a_checkpoint_without_a_provenance_record_still_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    meta = {
        "arch": {"name": "logreg", "kwargs": {}},
        "dataset": {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]},
        "train": {"l2": 0.0},
    }
    path = save_checkpoint(tmp_path / "old.safetensors", model, meta)
    _, doc = read_metadata(path)
    assert doc is not None and "provenance" not in doc
    _, info = load_checkpoint(path)
    assert info.provenance is None and "provenance" not in info.as_dict()
    save_checkpoint(tmp_path / "bad.safetensors", model, {**meta, "provenance": "yesterday"})
    with pytest.raises(CheckpointError, match="provenance is a JSON string"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_a_trained_checkpoint_carries_its_provenance(run):
    _, info = load_checkpoint("run")
    assert info.provenance is not None and info.provenance["device"] == "cpu"
    assert info.as_dict()["provenance"] == info.provenance
