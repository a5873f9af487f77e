"""Training: it learns, the regularisers do what they promise, averaging, resume, determinism."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flatcli.workflows.training as training
from flatcli import load_checkpoint, load_dataset, train
from flatcli.config import make_train_config
from flatcli.errors import RunExistsError, UnknownNameError, UsageError
from flatcli.workflows.checkpoint import read_metadata
from flatcli.workflows.training import (
    OPTIMIZERS,
    SCHEDULES,
    TrainCallbacks,
    evaluate,
    regularised_step,
)


def test_logreg_reaches_90_percent_on_digits_and_reduces_loss(make_config):
    result = train(make_config(epochs=5, out=Path("run")))
    first = result.history[0]
    assert result.metrics["test_accuracy"] > 0.90
    assert result.metrics["train_loss"] < first.train_loss
    model, info = load_checkpoint("run")
    x, y = load_dataset("digits", "test").tensors
    assert evaluate(model, x, y)[1] == pytest.approx(result.metrics["test_accuracy"])
    lines = (Path("run") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5]


def _one_step(optimizer: str, l2: float, wd: float, lr: float = 0.1):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w0 = w.detach().clone()
    w.grad = torch.randn(5)
    g = w.grad.clone()
    config = make_train_config(optimizer=optimizer, lr=lr, momentum=0.0, l2=l2, weight_decay=wd)
    opt = OPTIMIZERS[optimizer]([w], config)
    regularised_step(opt, [w], l2, wd)
    return w0, g, w.detach()


def test_coupled_l2_adds_l2_times_w_to_the_gradient():
    w0, g, w1 = _one_step("sgd", l2=0.3, wd=0.0)
    assert torch.allclose(w1, w0 - 0.1 * (g + 0.3 * w0))


def test_decoupled_weight_decay_shrinks_the_weights_before_the_step():
    w0, g, w1 = _one_step("sgd", l2=0.0, wd=0.3)
    assert torch.allclose(w1, w0 * (1 - 0.1 * 0.3) - 0.1 * g)


def test_decoupled_decay_with_adam_is_not_rescaled_by_the_adaptive_denominator():
    # Adam's first step moves each weight by lr * sign(grad) (up to eps); decay acts on w itself.
    w0, g, w1 = _one_step("adamw", l2=0.0, wd=0.5, lr=0.01)
    assert torch.allclose(w1, w0 * (1 - 0.01 * 0.5) - 0.01 * torch.sign(g), atol=1e-6)
    # coupled L2 with Adam enters the gradient, so the step is still lr * sign(g + l2 w)
    w0, g, w1 = _one_step("adam", l2=0.5, wd=0.0, lr=0.01)
    assert torch.allclose(w1, w0 - 0.01 * torch.sign(g + 0.5 * w0), atol=1e-6)


def test_paper_schedule_holds_decays_linearly_then_holds():
    config = make_train_config(epochs=100, schedule="paper", lr=1.0, lr_final=0.01)
    factor = SCHEDULES["paper"](config)
    assert factor(0) == factor(50) == 1.0
    assert factor(70) == pytest.approx(1 - 0.99 * 0.5)
    assert factor(90) == pytest.approx(0.01) and factor(100) == pytest.approx(0.01)


def test_averaging_equals_the_mean_of_the_epoch_snapshots(make_config):
    snapshots = []
    config = make_config(
        epochs=4, average_from=2, out=Path("avg"), model="mlp", model_kwargs={"width": 8}
    )
    original = training.train_one_epoch

    def spy(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return out

    training.train_one_epoch = spy
    try:
        train(config)
    finally:
        training.train_one_epoch = original
    averaged, _ = load_checkpoint("avg/model.safetensors")
    last, _ = load_checkpoint("avg/last.safetensors")
    flat = torch.cat([p.detach().flatten() for p in averaged.parameters()])
    assert torch.allclose(flat, torch.stack(snapshots[1:]).mean(0), atol=1e-6)
    assert torch.equal(torch.cat([p.detach().flatten() for p in last.parameters()]), snapshots[-1])


def test_averaging_recomputes_batchnorm_statistics(make_config):
    result = train(
        make_config(
            epochs=3,
            average_from=2,
            out=Path("bn"),
            model="cnn",
            model_kwargs={"batchnorm": True, "channels": 4},
        )
    )
    model, _ = load_checkpoint(result.checkpoint)
    x = load_dataset("digits").tensors[0]
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the running mean must equal the mean over the training set of the BN input
    captured = []
    h = bn.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    model.eval()
    with torch.no_grad():
        model(x)
    h.remove()
    # update_bn weights every batch equally (the last batch is smaller): equal to 1e-3
    assert torch.allclose(bn.running_mean, captured[0].mean((0, 2, 3)), atol=1e-3)
    last, _ = load_checkpoint("bn/last.safetensors")
    last_bn = next(m for m in last.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(last_bn.running_mean, bn.running_mean, atol=1e-3)


def _tensors(path):
    return load_file(str(path))


def test_same_seed_gives_bit_identical_checkpoints(make_config, fixed_provenance):
    train(make_config(out=Path("a"), model="mlp", model_kwargs={"width": 16}))
    train(make_config(out=Path("b"), model="mlp", model_kwargs={"width": 16}))
    assert Path("a/model.safetensors").read_bytes() == Path("b/model.safetensors").read_bytes()
    train(make_config(out=Path("c"), model="mlp", model_kwargs={"width": 16}, seed=1))
    assert Path("a/model.safetensors").read_bytes() != Path("c/model.safetensors").read_bytes()


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(make_config, fixed_provenance):
    kw = dict(
        model="mlp",
        model_kwargs={"width": 16},
        optimizer="adam",
        epochs=4,
        average_from=3,
        schedule="paper",
    )
    train(make_config(out=Path("full"), **kw))

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(make_config(out=Path("part"), **kw), TrainCallbacks(on_epoch=stop_after_two))
    assert not Path("part/model.safetensors").exists() and Path("part/resume.safetensors").exists()
    with pytest.raises(RunExistsError):  # an interrupted run is not silently restarted
        train(make_config(out=Path("part"), **kw))
    train(make_config(out=Path("part"), resume=True, **kw))
    assert (
        Path("full/model.safetensors").read_bytes() == Path("part/model.safetensors").read_bytes()
    )
    assert Path("full/last.safetensors").read_bytes() == Path("part/last.safetensors").read_bytes()
    assert len(Path("part/metrics.jsonl").read_text().splitlines()) == 4
    timeless = [{k: v for k, v in r.items() if k != "seconds"} for r in _csv_rows("part")]
    assert timeless == [{k: v for k, v in r.items() if k != "seconds"} for r in _csv_rows("full")]
    assert _csv_rows("part") == _jsonl_rows("part")  # 4 rows, none repeated by the resume


def _jsonl_rows(run):
    return [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]


def _csv_rows(run):
    with Path(run, "metrics.csv").open(newline="") as f:
        return [
            {k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def test_metrics_csv_has_the_rows_of_metrics_jsonl(make_config):
    result = train(make_config(out=Path("run"), epochs=3))
    text = Path("run/metrics.csv").read_text()
    assert (
        text.splitlines()[0] == "epoch,lr,train_loss,train_accuracy,test_loss,test_accuracy,seconds"
    )
    assert text.count("epoch") == 1  # the header once
    rows = _csv_rows("run")
    assert rows == _jsonl_rows("run") and [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows == [r.__dict__ for r in result.history]


def test_a_checkpoint_records_its_provenance(make_config):
    train(make_config(out=Path("run"), epochs=1))
    _, info = load_checkpoint("run")
    record = info.provenance
    assert record is not None and record["device"] == "cpu"
    assert record["torch"] == torch.__version__ and "time" in record and "command" in record
    _, meta = read_metadata("run/model.safetensors")
    assert meta is not None and meta["provenance"] == record


def test_existing_runs_and_files_are_never_overwritten_unless_asked(make_config):
    train(make_config(out=Path("run"), epochs=1))
    before = Path("run/model.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="--overwrite"):
        train(make_config(out=Path("run"), epochs=1, seed=3))
    assert Path("run/model.safetensors").read_bytes() == before
    train(make_config(out=Path("run"), epochs=1, seed=3, overwrite=True))
    assert Path("run/model.safetensors").read_bytes() != before
    Path("afile").write_text("keep me")
    with pytest.raises(RunExistsError, match="is a file"):
        train(make_config(out=Path("afile"), epochs=1))
    assert Path("afile").read_text() == "keep me"
    with pytest.raises(RunExistsError, match="already complete"):
        train(make_config(out=Path("run"), epochs=1, resume=True))


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(lr=-1.0),
        dict(batch_size=0),
        dict(l2=-0.1),
        dict(weight_decay=-1.0),
        dict(epochs=3, average_from=4),
    ],
)
def test_bad_option_values_are_usage_errors(bad):
    with pytest.raises(UsageError):
        make_train_config(**bad)


def test_unknown_names_say_what_is_known():
    with pytest.raises(UnknownNameError, match="gadam, swa"):
        make_train_config(recipe="nope")


def test_recipes_fill_defaults_and_explicit_options_win():
    g = make_train_config(recipe="gadam", epochs=10)
    assert (g.optimizer, g.weight_decay, g.l2, g.schedule, g.average_from) == (
        "adamw",
        0.25,
        0.0,
        "paper",
        6,
    )
    assert g.final_lr == pytest.approx(0.5 * g.lr)
    s = make_train_config(recipe="swa", epochs=10, lr=0.2, l2=0.0)
    assert (s.optimizer, s.lr, s.l2) == ("sgd", 0.2, 0.0) and s.final_lr == pytest.approx(0.1)
