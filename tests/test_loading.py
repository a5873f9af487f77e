"""The user's own model: weights saved by other tools, built by the user's factory, with
outputs that are not a plain logits tensor. Each form must measure exactly what flatcli's
own checkpoint of the same weights measures.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from flatcli import build_model, load_checkpoint, load_dataset
from flatcli.analysis.measures import measure, parameter_groups
from flatcli.cli import app
from flatcli.config import SharpnessConfig
from flatcli.errors import CheckpointError, UsageError
from flatcli.models.factory import LogitsOf, pick_logits
from flatcli.workflows.checkpoint import save_checkpoint
from flatcli.workflows.training import evaluate

runner = CliRunner()

ARCH = {"name": "mlp", "kwargs": {"width": 8, "depth": 1}}
DIGITS = {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8]}
#: flatcli's own builder, named as an installed package's function, with keyword arguments
FACTORY = [
    "--model-factory",
    "flatcli.models:build_model",
    "--factory-arg",
    "name=mlp",
    "--factory-arg",
    "input_shape=[1, 8, 8]",
    "--factory-arg",
    "num_classes=10",
    "--factory-arg",
    "width=8",
]
MEASURE = ["--samples", "64", "--dtype", "float64", "--measures", "lambda_max", "--json"]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=10, width=8)


def own_checkpoint(model: nn.Module, path: Path) -> Path:
    return save_checkpoint(path, model, {"arch": ARCH, "dataset": DIGITS})


def lambda_max(args: list[str]) -> tuple[float, str]:
    result = runner.invoke(app, ["sharpness", *args, *MEASURE])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["lambda_max"]["value"], result.stderr


def one_line(result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, (
        result.stderr
    )
    return lines[0]


def _plain(sd):
    return {k: v.contiguous() for k, v in sd.items()}


# Each form: the file name, what is saved, and the note loading must print.
FORMS = {
    "safetensors without metadata": ("w.safetensors", lambda sd: sd, None),
    ".pt state dict": ("w.pt", lambda sd: sd, None),
    ".pth under model_state_dict": (
        "w.pth",
        lambda sd: {"model_state_dict": sd, "epoch": 7},
        "'model_state_dict'",
    ),
    "Lightning .ckpt": (
        "w.ckpt",
        lambda sd: {
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "epoch": 3,
            "global_step": 30,
            "hyper_parameters": {"lr": 0.1},
        },
        "stripped the prefix 'model.' from 4 keys",
    ),
    "DDP module. prefix": (
        "w.pt",
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        "stripped the prefix 'module.' from 4 keys",
    ),
    "DDP around torch.compile in a .bin": (
        "w.bin",
        lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
        "stripped the prefix 'module._orig_mod.' from 4 keys",
    ),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_loading_form_measures_what_flatclis_own_checkpoint_does(tmp_path, form):
    name, wrap, note = FORMS[form]
    model = mlp()
    reference, _ = lambda_max([str(own_checkpoint(model, tmp_path / "own.safetensors"))])
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(_plain(model.state_dict()), str(path))
    else:
        torch.save(wrap(model.state_dict()), path)
    value, stderr = lambda_max([str(path), *FACTORY, "--dataset", "digits"])
    assert value == pytest.approx(reference, rel=1e-12, abs=0)
    if note:
        assert note in stderr
    if form == "Lightning .ckpt":
        assert "read the state dict under 'state_dict' (a Lightning checkpoint)" in stderr


def test_a_torch_file_of_any_name_is_known_by_its_first_bytes(tmp_path):
    model = mlp()
    torch.save(model.state_dict(), tmp_path / "weights")
    torch.save(model.state_dict(), tmp_path / "legacy", _use_new_zipfile_serialization=False)
    for name in ("weights", "legacy"):
        loaded, _ = load_checkpoint(tmp_path / name, model_factory=mlp)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_prefix_is_stripped_only_when_every_key_has_it(tmp_path):
    sd = mlp().state_dict()
    keys = list(sd)
    mixed = {(f"module.{k}" if k != keys[0] else k): v for k, v in sd.items()}
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "mixed.pt", model_factory=mlp)
    # every key prefixed, but the stripped names are not the model's: refused, naming the keys
    torch.save(
        {f"module.{k}".replace("head.bias", "head.b"): v for k, v in sd.items()},
        tmp_path / "other.pt",
    )
    with pytest.raises(
        CheckpointError,
        match=r"keys stripped of 'module\.'.*missing head\.bias; unexpected head\.b$",
    ):
        load_checkpoint(tmp_path / "other.pt", model_factory=mlp)


def test_a_module_function_factory_on_sys_path_and_a_file_factory_with_arguments(
    tmp_path, monkeypatch
):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "zoo.py").write_text(
        "from flatcli import build_model\n"
        "def small(width, classes=10):\n"
        "    return build_model('mlp', input_shape=(1, 8, 8), num_classes=classes, width=width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = mlp(seed=3)
    reference, _ = lambda_max([str(own_checkpoint(model, tmp_path / "own.safetensors"))])
    torch.save(model.state_dict(), tmp_path / "w.pt")
    common = ["--factory-arg", "width=8", "--dataset", "digits"]
    assert (
        lambda_max([str(tmp_path / "w.pt"), "--model-factory", "pkg.zoo:small", *common])[0]
        == reference
    )
    spec = f"{tmp_path / 'pkg' / 'zoo.py'}:small"
    assert lambda_max([str(tmp_path / "w.pt"), "--model-factory", spec, *common])[0] == reference
    # a wrong argument is the factory's failure: one line naming it
    bad = runner.invoke(
        app,
        [
            "sharpness",
            str(tmp_path / "w.pt"),
            "--model-factory",
            "pkg.zoo:small",
            "--factory-arg",
            "depth=2",
            "--dataset",
            "digits",
        ],
    )
    assert "the model factory pkg.zoo:small with depth=2 failed: TypeError" in one_line(bad, 1)


def test_torchvision_resnet18_with_num_classes_keeps_its_names_and_its_curvature(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10).eval()
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, tmp_path / "resnet.pt")
    with pytest.warns(UserWarning, match="stripped the prefix 'module.' from 122 keys"):
        model, info = load_checkpoint(
            tmp_path / "resnet.pt",
            model_factory="torchvision.models:resnet18",
            factory_args={"num_classes": 10},
        )
    assert info.dataset == {} and isinstance(model, LogitsOf) and not model.training
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert list(model.state_dict()) == list(original.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    config = SharpnessConfig(measures=("lambda_max",), dtype="float64", max_iter=3, tol=1e-3)
    got, want = measure(model, x, y, config), measure(original, x, y, config)
    assert got.measures["lambda_max"].value == pytest.approx(
        want.measures["lambda_max"].value, rel=1e-12
    )


def test_a_pickle_that_needs_code_is_refused_and_its_code_never_runs(tmp_path, monkeypatch):
    (tmp_path / "evil.py").write_text(
        "import pathlib, torch\n"
        "class Net(torch.nn.Linear):\n"
        "    def __setstate__(self, state):\n"
        "        pathlib.Path('RAN').write_text('code from the file ran')\n"
        "        super().__setstate__(state)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import evil

    torch.save(evil.Net(64, 10), tmp_path / "whole-model.pt")
    result = runner.invoke(
        app, ["sharpness", str(tmp_path / "whole-model.pt"), *FACTORY, "--dataset", "digits"]
    )
    line = one_line(result, 1)
    assert "needs code to be unpickled (evil.Net)" in line and "weights_only=True" in line
    assert "torch.save(model.state_dict(), PATH)" in line
    assert not (tmp_path / "RAN").exists()
    sys.modules.pop("evil", None)


def test_a_file_without_metadata_needs_a_factory_and_a_data_set(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "w.pt")
    no_factory = runner.invoke(app, ["sharpness", str(tmp_path / "w.pt")])
    assert (
        "has no flatcli metadata" in one_line(no_factory, 1)
        and "--model-factory" in no_factory.stderr
    )
    no_dataset = runner.invoke(app, ["sharpness", str(tmp_path / "w.pt"), *FACTORY])
    assert "pass --dataset" in one_line(no_dataset, 1)
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.ckpt")
    empty = runner.invoke(
        app, ["sharpness", str(tmp_path / "empty.ckpt"), *FACTORY, "--dataset", "digits"]
    )
    assert "holds no tensors (keys: 'epoch', 'note')" in one_line(empty, 1)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model-factory", "torchvision.models"], 2, "is not MODULE:FUNCTION"),
        (["--model-factory", "no_such_module_xyz:build"], 1, "cannot import no_such_module_xyz"),
        (
            ["--model-factory", "flatcli.models:no_such_function"],
            1,
            "has no function no_such_function",
        ),
        (
            ["--model-factory", "json:dumps", "--factory-arg", "obj=1"],
            1,
            "returned str, not a torch.nn.Module",
        ),
        ([*FACTORY, "--factory-arg", "width"], 2, "--factory-arg 'width' is not KEY=VALUE"),
        (["--factory-arg", "width=8"], 2, "--factory-arg needs --model-factory"),
        (["--output", "logits"], 2, "--output applies to a model built by --model-factory"),
    ],
)
def test_factory_mistakes_are_one_line(tmp_path, args, code, message):
    torch.save(mlp().state_dict(), tmp_path / "w.pt")
    own_checkpoint(mlp(), tmp_path / "own.safetensors")
    target = "own.safetensors" if args[0] == "--output" else "w.pt"
    result = runner.invoke(app, ["sharpness", str(tmp_path / target), *args, "--dataset", "digits"])
    assert message in one_line(result, code)


# --- models whose forward returns more than the logits --------------------------------------

OUTPUTS = '''
import collections, dataclasses, torch
from flatcli import build_model

class Base(torch.nn.Module):
    """flatcli's MLP and a parameter of its own at the top level."""
    def __init__(self):
        super().__init__()
        self.net = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, width=8)
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))
    def logits(self, x):
        return self.net(x) * self.temperature

@dataclasses.dataclass
class Output:  # as Hugging Face's ModelOutput, an object with attributes
    loss: object
    logits: torch.Tensor
    hidden: torch.Tensor

Aux = collections.namedtuple("Aux", "features logits")

class DictOut(Base):
    def forward(self, x):
        return {"logits": self.logits(x), "features": x.flatten(1)}
class TupleOut(Base):
    def forward(self, x):
        return self.logits(x), x.flatten(1)
class ObjectOut(Base):
    def forward(self, x):
        return Output(None, self.logits(x), x.flatten(1))
class NamedTupleOut(Base):
    def forward(self, x):
        return Aux(x.flatten(1), self.logits(x))
class OnlyTensorOut(Base):
    def forward(self, x):
        return {"scores": self.logits(x), "n": 3}
class TwoHeads(Base):
    def forward(self, x):
        return {"scores": self.logits(x), "features": x.flatten(1)}
class FeaturesFirst(Base):
    def forward(self, x):
        return [x.flatten(1).unsqueeze(1), self.logits(x)]
class Plain(Base):
    def forward(self, x):
        return self.logits(x)
'''


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    (tmp_path / "outputs_zoo.py").write_text(OUTPUTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import outputs_zoo

    yield outputs_zoo
    sys.modules.pop("outputs_zoo", None)


@pytest.mark.parametrize(
    "cls, output",
    [
        ("DictOut", None),
        ("TupleOut", None),
        ("ObjectOut", None),
        ("NamedTupleOut", None),
        ("OnlyTensorOut", None),
        ("TwoHeads", "scores"),
        ("FeaturesFirst", "1"),
        ("ObjectOut", "logits"),
        ("DictOut", "logits"),
    ],
)
def test_the_logits_are_picked_out_of_dicts_tuples_and_objects(tmp_path, outputs, cls, output):
    torch.manual_seed(0)
    reference = outputs.Plain().eval()
    save_file(_plain(reference.state_dict()), str(tmp_path / "w.safetensors"))
    model, _ = load_checkpoint(
        tmp_path / "w.safetensors", model_factory=getattr(outputs, cls), output=output
    )
    # the names are the user's: no prefix from the wrapper, in the model and in per-layer reports
    assert [n for n, _ in model.named_parameters()] == [
        "temperature",
        "net.hidden.0.weight",
        "net.hidden.0.bias",
        "net.head.weight",
        "net.head.bias",
    ]
    assert parameter_groups(model) == parameter_groups(reference)
    x = torch.randn(32, 1, 8, 8)
    y = torch.arange(32) % 10
    config = SharpnessConfig(measures=("lambda_max",), dtype="float64")
    got, want = measure(model, x, y, config), measure(reference, x, y, config)
    assert got.measures["lambda_max"].value == pytest.approx(
        want.measures["lambda_max"].value, rel=1e-12
    )


def test_an_output_without_a_rule_is_one_line_suggesting_output(tmp_path, outputs):
    torch.manual_seed(0)
    save_file(_plain(outputs.Plain().state_dict()), str(tmp_path / "w.safetensors"))
    factory = ["--model-factory", f"{tmp_path / 'outputs_zoo.py'}:TwoHeads", "--dataset", "digits"]
    result = runner.invoke(app, ["sharpness", str(tmp_path / "w.safetensors"), *factory])
    line = one_line(result, 1)
    assert "the model returned a dict with keys 'scores', 'features'" in line and "--output" in line
    wrong = runner.invoke(
        app, ["sharpness", str(tmp_path / "w.safetensors"), *factory, "--output", "logits"]
    )
    assert "without the key 'logits'" in one_line(wrong, 2)
    ok = runner.invoke(
        app,
        ["sharpness", str(tmp_path / "w.safetensors"), *factory, "--output", "scores", *MEASURE],
    )
    assert ok.exit_code == 0, ok.stderr


def test_the_rule_in_detail():
    t = torch.zeros(2, 3)
    assert pick_logits(t) is t
    assert pick_logits((t, torch.zeros(2, 5, 5))) is t
    assert pick_logits({"a": t, "b": 1}) is t
    assert pick_logits([1, t], "1") is t
    with pytest.raises(
        CheckpointError, match=r"returned a tuple of 2 \(tensor 2x3x1, tensor 2x3\)"
    ):
        pick_logits((t[..., None], t))
    with pytest.raises(UsageError, match="indices 0 to 1"):
        pick_logits((t, t), "2")
    with pytest.raises(UsageError, match="picks a int"):
        pick_logits({"a": 1}, "a")


# --- the other commands that load a checkpoint -----------------------------------------------


def test_compare_with_a_model_factory(tmp_path):
    own = [own_checkpoint(mlp(seed), tmp_path / f"own{seed}.safetensors") for seed in (1, 2)]
    for seed in (1, 2):
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in mlp(seed).state_dict().items()},
                "epoch": 3,
            },
            tmp_path / f"run{seed}.ckpt",
        )
    args = ["--measures", "lambda_max", "--samples", "64", "--dtype", "float64", "--json"]
    result = runner.invoke(
        app,
        [
            "compare",
            str(tmp_path / "run1.ckpt"),
            str(tmp_path / "run2.ckpt"),
            *FACTORY,
            "--dataset",
            "digits",
            *args,
        ],
    )
    assert result.exit_code == 0, result.stderr
    runs = json.loads(result.stdout)["runs"]
    assert [r["name"] for r in runs] == ["run1", "run2"]
    assert result.stderr.count("stripped the prefix 'model.' from 4 keys") == 2  # once per run
    for run, path in zip(runs, own, strict=True):
        assert run["lambda_max"]["value"] == pytest.approx(
            lambda_max([str(path)])[0], rel=1e-12, abs=0
        )
        # evaluated on the whole test split: a file from elsewhere records no metrics
        model, _ = load_checkpoint(path)
        test_loss, test_accuracy = evaluate(model, *load_dataset("digits", "test").tensors)
        assert run["test_accuracy"] == pytest.approx(test_accuracy, rel=1e-12)
        assert run["test_loss"] == pytest.approx(test_loss, rel=1e-6)
    no_dataset = runner.invoke(
        app, ["compare", str(tmp_path / "run1.ckpt"), str(tmp_path / "run2.ckpt"), *FACTORY]
    )
    assert "pass --dataset" in one_line(no_dataset, 1)


def test_rank_bound_with_a_model_factory(tmp_path):
    torch.manual_seed(0)
    model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    own = save_checkpoint(
        tmp_path / "own.safetensors",
        model,
        {"arch": {"name": "logreg", "kwargs": {}}, "dataset": DIGITS},
    )
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    args = ["--samples", "40", "--json"]
    want = runner.invoke(app, ["rank-bound", str(own), *args])
    got = runner.invoke(
        app,
        [
            "rank-bound",
            str(tmp_path / "w.pt"),
            "--model-factory",
            "flatcli.models:build_model",
            "--factory-arg",
            "name=logreg",
            "--factory-arg",
            "input_shape=[1,8,8]",
            "--factory-arg",
            "num_classes=10",
            "--dataset",
            "digits",
            *args,
        ],
    )
    assert want.exit_code == 0 and got.exit_code == 0, (want.stderr, got.stderr)
    assert "stripped the prefix 'module.' from 2 keys" in got.stderr
    got_doc, want_doc = json.loads(got.stdout), json.loads(want.stdout)
    del got_doc["provenance"], want_doc["provenance"]  # each call's own time
    assert got_doc == want_doc
