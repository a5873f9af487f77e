"""The Python API takes the user's own model and data, as the field's tools do.

``flatcli.sharpness(model_or_path, data, measures=..., **settings)`` and
``CurvatureOperator(model, data)`` accept a pair of tensors, a DataLoader or any
re-iterable of (x, y) batches; a stream is read batch by batch, once per data pass, and
must give the same function every pass (a shuffling or randomly augmenting loader is
refused in one line). Every number is checked against dense float64 computation or
against the same data given as tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typer.testing import CliRunner

import flatcli
import flatcli.curvature.operator as operator_module
from flatcli.cli import app
from flatcli.config import SharpnessConfig
from flatcli.curvature import (
    CurvatureOperator,
    dense_hessian,
    hessian_via_torch_func,
    hutchpp_trace,
    lambda_max,
)
from flatcli.errors import DataError, FlatcliError, UsageError
from flatcli.report.schema import ENVELOPE_KEYS, SCHEMA_VERSION


def _mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [
        nn.Linear(6, 8),
        *([nn.BatchNorm1d(8)] if batchnorm else []),
        nn.Tanh(),
        nn.Linear(8, 3),
    ]
    return nn.Sequential(*layers)


def _data(n: int = 50, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# --- the same numbers from every form of the data -------------------------------------------------

MEASURES = "lambda_max,lambda_min,trace,frobenius,density,adaptive_sharpness,relative_flatness"


def test_a_dataloader_a_list_of_batches_and_a_tensor_pair_give_the_same_report():
    model, (x, y) = _mlp(), _data()
    settings = dict(
        measures=MEASURES,
        dtype="float64",
        tol=1e-8,
        density_probes=2,
        density_iterations=10,
        sharpness_samples=4,
        probes=20,
    )
    pair = flatcli.sharpness(model, (x, y), batch_size=16, **settings)
    loader = flatcli.sharpness(model, DataLoader(TensorDataset(x, y), batch_size=16), **settings)
    batches = flatcli.sharpness(
        model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)], **settings
    )
    for streamed in (loader, batches):
        assert streamed.num_samples == pair.num_samples == 50
        assert streamed.loss == pytest.approx(pair.loss, abs=1e-10)
        assert streamed.accuracy == pair.accuracy
        for name in (
            "lambda_max",
            "lambda_min",
            "trace",
            "frobenius",
            "adaptive_sharpness",
            "relative_flatness",
        ):
            assert streamed.measures[name].value == pytest.approx(
                pair.measures[name].value, abs=1e-10
            ), name
        assert streamed.measures["trace"].uncertainty == pytest.approx(
            pair.measures["trace"].uncertainty, abs=1e-10
        )
        torch.testing.assert_close(
            torch.tensor(streamed.measures["density"].values),
            torch.tensor(pair.measures["density"].values),
            rtol=0,
            atol=1e-10,
        )


def test_the_operator_streams_a_loader_once_per_pass_batch_by_batch():
    model, (x, y) = _mlp(), _data()

    class Counting(Dataset):
        reads = 0

        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            Counting.reads += 1
            return x[i], y[i]

    op = CurvatureOperator(model, DataLoader(Counting(), batch_size=16), dtype=torch.float64)
    assert Counting.reads == 2 * 50  # construction reads it twice (the determinism check)
    assert (op.num_samples, op.batch_size) == (50, 16)
    ref = CurvatureOperator(model, x, y, dtype=torch.float64)
    v = torch.randn(op.num_params, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(v), ref.matmat(v), rtol=0, atol=1e-12)
    assert Counting.reads == 3 * 50  # one pass for a block of three products
    torch.testing.assert_close(op.gradient(), ref.gradient(), rtol=0, atol=1e-12)
    assert op.loss_and_accuracy()[0] == pytest.approx(ref.loss_and_accuracy()[0], abs=1e-12)
    torch.testing.assert_close(
        dense_hessian(op), hessian_via_torch_func(model, x, y), rtol=0, atol=1e-10
    )
    assert lambda_max(op, tol=1e-8).value == pytest.approx(
        lambda_max(ref, tol=1e-8).value, abs=1e-10
    )
    assert hutchpp_trace(op, probes=12, seed=3).value == pytest.approx(
        hutchpp_trace(ref, probes=12, seed=3).value, abs=1e-10
    )


def test_kept_gradient_graphs_stay_correct_with_a_stream():
    model, (x, y) = _mlp(), _data()
    op = CurvatureOperator(
        model, DataLoader(TensorDataset(x, y), batch_size=16), dtype=torch.float64, cache_graph=True
    )
    v = torch.randn(op.num_params, 2, dtype=torch.float64)
    first, second = op.matmat(v), op.matmat(v)  # the second from the kept graphs
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(first, hessian_via_torch_func(model, x, y) @ v, rtol=0, atol=1e-10)


def test_with_batch_statistics_the_loaders_batches_define_the_matrix():
    model, (x, y) = _mlp(batchnorm=True), _data(48)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    streamed = CurvatureOperator(model, loader, bn_mode="batch", dtype=torch.float64)
    in_memory = CurvatureOperator(model, x, y, bn_mode="batch", batch_size=16, dtype=torch.float64)
    expected = sum(
        hessian_via_torch_func(model, x[i : i + 16], y[i : i + 16], bn_mode="batch") / 3
        for i in range(0, 48, 16)
    )
    torch.testing.assert_close(dense_hessian(streamed), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(dense_hessian(in_memory), expected, rtol=0, atol=1e-10)
    report = flatcli.sharpness(
        model, loader, measures="lambda_max", bn_mode="batch", dtype="float64"
    )
    assert report.bn_batch_size == 16
    # "full": the statistics of all N, the loader's batches gathered into one
    full = CurvatureOperator(model, loader, bn_mode="full", dtype=torch.float64)
    torch.testing.assert_close(
        dense_hessian(full), hessian_via_torch_func(model, x, y, bn_mode="full"), rtol=0, atol=1e-10
    )
    assert (
        flatcli.sharpness(model, loader, measures="lambda_max", bn_mode="full").bn_batch_size == 48
    )


def test_exact_logistic_regression_from_a_stream_equals_its_closed_form():
    torch.manual_seed(0)
    model, (x, y) = nn.Linear(6, 3), _data()
    settings = dict(measures="lambda_max,trace", exact=True, dtype="float64")
    streamed = flatcli.sharpness(model, DataLoader(TensorDataset(x, y), batch_size=16), **settings)
    pair = flatcli.sharpness(model, (x, y), **settings)  # the closed form
    for name in ("lambda_max", "trace"):
        assert streamed.measures[name].value == pytest.approx(pair.measures[name].value, abs=1e-10)


# --- a stream must be one fixed function ----------------------------------------------------------


class Augmenting(Dataset):
    """Adds fresh noise to every read: random augmentation."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]


def test_a_shuffling_or_randomly_augmenting_loader_is_refused_in_one_line():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(DataError) as shuffled:
        flatcli.sharpness(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    assert "shuffle" in _one_line(shuffled)
    with pytest.raises(DataError) as augmented:
        CurvatureOperator(model, DataLoader(Augmenting(x, y), batch_size=16))
    assert "changes between passes" in _one_line(augmented) and "inputs" in str(augmented.value)
    with pytest.raises(DataError) as one_shot:
        flatcli.sharpness(model, ((x[i : i + 10], y[i : i + 10]) for i in range(0, 50, 10)))
    assert "one-shot" in _one_line(one_shot)
    with pytest.raises(DataError) as samples:  # a Dataset of single samples, not batches
        flatcli.sharpness(model, TensorDataset(x, y))
    assert "DataLoader" in _one_line(samples)


def test_a_stream_that_changes_after_the_check_stops_the_measurement():
    model, (x, y) = _mlp(), _data()
    batches = [(x[i : i + 16], y[i : i + 16].clone()) for i in range(0, 50, 16)]
    op = CurvatureOperator(model, batches)
    batches[1][1][0] = (batches[1][1][0] + 1) % 3  # a label changes
    with pytest.raises(DataError, match="changed since it was checked"):
        op.gradient()


def test_batch_size_does_not_apply_to_a_loader():
    model, (x, y) = _mlp(), _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(UsageError, match="loader's batch_size"):
        CurvatureOperator(model, loader, batch_size=8)
    with pytest.raises(UsageError, match="loader's batch_size"):
        flatcli.sharpness(model, loader, batch_size=8)


# --- flatcli.sharpness as a function of the user's model -----------------------------------------


def test_sharpness_of_a_module_matches_the_dense_float64_hessian():
    model, (x, y) = _mlp(), _data()
    report = flatcli.sharpness(
        model, (x, y), measures="lambda_max,trace", dtype="float64", tol=1e-8, probes=60
    )
    eigs = torch.linalg.eigvalsh(hessian_via_torch_func(model, x, y))
    assert report.measures["lambda_max"].value == pytest.approx(float(eigs[-1]), rel=1e-7)
    assert (
        abs(report.measures["trace"].value - float(eigs.sum()))
        <= 4 * report.measures["trace"].uncertainty
    )
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x).double(), y))
    assert report.loss == pytest.approx(loss, abs=1e-6)
    assert report.checkpoint is None and report.num_params == eigs.numel()


def test_unknown_settings_and_missing_data_are_one_line():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(UsageError) as unknown:
        flatcli.sharpness(model, (x, y), tolerance=1e-6, lanczos_steps=3)
    text = _one_line(unknown)
    assert "lanczos_steps, tolerance" in text and "tol" in text and "max_iter" in text
    with pytest.raises(UsageError) as no_data:
        flatcli.sharpness(model)
    assert "needs data" in _one_line(no_data)
    with pytest.raises(FlatcliError) as bad_measure:
        flatcli.sharpness(model, (x, y), measures="lambda_max,sharpest")
    assert "sharpest" in _one_line(bad_measure)
    with pytest.raises(DataError) as labels:
        flatcli.sharpness(model, (x, y + 3))
    assert "only 3 outputs" in _one_line(labels)
    with pytest.raises(UsageError) as wrong_type:
        flatcli.sharpness(model, (x, y), tol="small")
    _one_line(wrong_type)
    assert (
        flatcli.sharpness(
            model, (x, y), measures=("lambda_max",), dtype=torch.float64, max_iter=5
        ).dtype
        == "float64"
    )


def test_the_users_model_is_left_exactly_as_it_was():
    model, (x, y) = _mlp(batchnorm=True), _data()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in train mode
    model[0].bias.requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    settings = dict(
        measures=MEASURES,
        density_probes=2,
        density_iterations=8,
        sharpness_samples=4,
        probes=8,
        max_iter=10,
        per_layer=True,
    )
    for bn_mode in ("eval", "batch"):
        flatcli.sharpness(
            model, DataLoader(TensorDataset(x, y), batch_size=25), bn_mode=bn_mode, **settings
        )
    flatcli.sharpness(model, (x, y), exact=True, **settings)
    assert [m.training for m in model.modules()] == flags
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())


def test_a_model_returning_a_dict_is_measured_through_its_logits_and_left_as_it_was():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return {"features": x, "scores": self.net(x)}

    model, (x, y) = Dict(), _data()
    model.train()
    report = flatcli.sharpness(
        model, (x, y), measures="lambda_max", output="scores", dtype="float64"
    )
    plain = flatcli.sharpness(model.net, (x, y), measures="lambda_max", dtype="float64")
    assert report.measures["lambda_max"].value == pytest.approx(
        plain.measures["lambda_max"].value, abs=1e-10
    )
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(FlatcliError) as unclear:  # two tensors and no "logits": which one?
        flatcli.sharpness(model, (x, y), measures="lambda_max")
    assert "output" in _one_line(unclear)


def test_a_config_as_second_argument_and_to_dict_as_the_clis_json(tmp_path):
    ckpt = "sample_checkpoints/logreg-sgd.safetensors"
    root = Path(__file__).resolve().parents[1]
    config = SharpnessConfig(measures=("lambda_max",), samples=100, dtype="float64")
    report = flatcli.sharpness(root / ckpt, config)
    result = CliRunner().invoke(
        app,
        [
            "sharpness",
            str(root / ckpt),
            "--measures",
            "lambda_max",
            "--samples",
            "100",
            "--dtype",
            "float64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [doc.pop(k) for k in ENVELOPE_KEYS] == [SCHEMA_VERSION, flatcli.__version__, "sharpness"]
    mine = report.to_dict()
    assert list(mine) == list(doc)
    for key in set(doc) - {"seconds"}:
        assert mine[key] == doc[key] or key == "provenance", key
    del mine["provenance"]["time"], doc["provenance"]["time"]  # each call's own
    assert mine["provenance"] == doc["provenance"]
    assert report.as_dict().keys() == mine.keys()
    again = flatcli.sharpness(root / ckpt, config=config, tol=1e-3)  # settings over a config
    assert again.measures["lambda_max"].value == pytest.approx(
        report.measures["lambda_max"].value, rel=1e-3
    )
    # the same checkpoint measured on data given by the caller
    x, y = flatcli.load_dataset("digits", samples=100).tensors
    given = flatcli.sharpness(root / ckpt, (x, y), measures=["lambda_max"], dtype="float64")
    assert given.measures["lambda_max"].value == pytest.approx(
        report.measures["lambda_max"].value, abs=1e-10
    )


# --- the README's worked example -----------------------------------------------------------------


def test_readme_example_a_torchvision_resnet_on_a_dataloader():
    """README "Your own model and data": a torchvision ResNet and a DataLoader. A tiny one
    (one BasicBlock per stage) on six random 16x16 images; the curvature is over the
    parameters that require grad (here the last block's BatchNorm and the classifier,
    2,563 of them), so that the dense float64 Hessian is the reference.
    """
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("layer4.0.bn2", "fc")))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # no shuffling: one fixed loss

    report = flatcli.sharpness(
        model, loader, measures="lambda_max,trace", dtype="float64", tol=1e-8
    )

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    eigs = torch.linalg.eigvalsh(hessian_via_torch_func(model, x, y, param_names=names))
    assert report.num_params == len(eigs) == 2563 and report.num_samples == 6
    assert report.measures["lambda_max"].value == pytest.approx(float(eigs[-1]), rel=1e-7)
    assert (
        abs(report.measures["trace"].value - float(eigs.sum()))
        <= 4 * report.measures["trace"].uncertainty
    )
    assert model.training  # still in train mode, as built
    bound = report.to_dict()["lambda_max"]["uncertainty"]
    assert bound == report.measures["lambda_max"].uncertainty
    assert abs(report.measures["lambda_max"].value - float(eigs[-1])) <= bound
    assert torchvision.models.resnet18  # the README's model


def test_whole_set_batchnorm_statistics_from_a_loader_are_refused_under_torchrun(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)
    )
    loader = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), batch_size=4)
    monkeypatch.setattr(
        operator_module, "distributed_active", lambda: True
    )  # as under torchrun with 2 processes
    with pytest.raises(UsageError, match="full.*torchrun"):
        operator_module.CurvatureOperator(model, loader, bn_mode="full")
