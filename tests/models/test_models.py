"""Specification of the model zoo (flatcli.models).

Heavy models are checked through small variants (VGG width 1/8, PreResNet-20, WRN-10-2);
the full-size defaults are only built and their parameters counted against published
figures or independent formulas.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flatcli.errors import FlatcliError
from flatcli.models import (
    MODELS,
    LayerInfo,
    build_model,
    layer_fan_ins,
    model_names,
    resolve_kwargs,
)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]  # digits, MNIST / Fashion-MNIST, CIFAR
SMALL = {  # cheap variants of every model, for forward passes
    "logreg": {},
    "mlp": {"width": 16, "depth": 2},
    "cnn": {"channels": 4, "batchnorm": True},
    "vgg16": {"width_factor": 0.125},
    "preresnet": {"depth": 20, "width": 4},
    "wrn": {"depth": 10, "widen": 1},
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, shape=(1, 8, 8), classes: int = 10, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, input_shape=shape, num_classes=classes, **kwargs)


# ----------------------------------------------------------------------------------------
# Registry


def test_registry_lists_the_papers_models_in_order():
    assert model_names() == ["logreg", "mlp", "cnn", "vgg16", "preresnet", "wrn"]
    assert set(SMALL) == set(MODELS)
    for name, spec in MODELS.items():
        assert spec.name == name and spec.help


def test_defaults_are_the_documented_ones():
    assert {name: spec.defaults for name, spec in MODELS.items()} == {
        "logreg": {},
        "mlp": {"width": 64, "depth": 1},
        "cnn": {"channels": 16, "batchnorm": False},
        "vgg16": {"batchnorm": True, "width_factor": 1.0},
        "preresnet": {"depth": 110, "width": 16},
        "wrn": {"depth": 28, "widen": 10, "dropout": 0.0},
    }


def test_unknown_model_name_is_a_flatcli_error_listing_the_models():
    with pytest.raises(FlatcliError, match="unknown model 'resnet50'") as err:
        build_model("resnet50", input_shape=(3, 32, 32), num_classes=10)
    assert "preresnet" in err.value.hint and "wrn" in err.value.hint


def test_unknown_kwarg_is_rejected_with_the_allowed_ones():
    with pytest.raises(FlatcliError, match="no argument 'widht'") as err:
        build_model("mlp", input_shape=(1, 8, 8), num_classes=10, widht=3)
    assert "width=64" in err.value.hint and "depth=1" in err.value.hint
    with pytest.raises(FlatcliError, match="no argument 'depth'"):
        resolve_kwargs("logreg", depth=2)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("mlp", {"width": 2.5}),
        ("mlp", {"depth": "2"}),
        ("mlp", {"depth": True}),  # a bool is not a depth
        ("cnn", {"batchnorm": 1}),
        ("vgg16", {"width_factor": "half"}),
        ("wrn", {"dropout": float("nan")}),
    ],
)
def test_kwargs_of_the_wrong_type_are_rejected(name, kwargs):
    with pytest.raises(FlatcliError, match="is not a"):
        resolve_kwargs(name, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("mlp", {"width": 0}, "width must be >= 1"),
        ("mlp", {"depth": -1}, "depth must be >= 0"),
        ("cnn", {"channels": 0}, "channels must be >= 1"),
        ("vgg16", {"width_factor": 0.0}, "width_factor must be > 0"),
        ("preresnet", {"depth": 21}, "invalid depth 21"),
        ("preresnet", {"depth": 44}, "invalid depth 44"),  # 42 is not a multiple of 9
        ("preresnet", {"depth": 2}, "invalid depth 2"),
        ("preresnet", {"width": 0}, "width must be >= 1"),
        ("wrn", {"depth": 27}, "invalid depth 27"),
        ("wrn", {"depth": 4}, "invalid depth 4"),
        ("wrn", {"widen": 0}, "widen must be >= 1"),
        ("wrn", {"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_invalid_kwarg_values_are_rejected(name, kwargs, message):
    with pytest.raises(FlatcliError, match=message):
        build(name, shape=(3, 32, 32), **kwargs)


@pytest.mark.parametrize("shape", [(8, 8), (3, 0, 32), "3x32x32"])
def test_conv_nets_need_a_c_h_w_input_shape(shape):
    with pytest.raises(FlatcliError, match="input_shape"):
        build("cnn", shape=shape)


@pytest.mark.parametrize("classes", [0, 1, 2.0, True])
def test_num_classes_must_be_an_integer_of_at_least_two(classes):
    with pytest.raises(FlatcliError, match="num_classes"):
        build("logreg", classes=classes)


@pytest.mark.parametrize("name", list(SMALL))
def test_resolved_kwargs_are_json_and_rebuild_the_same_model(name):
    resolved = resolve_kwargs(name, **SMALL[name])
    assert set(resolved) == set(MODELS[name].defaults)
    recorded = json.loads(json.dumps({"name": name, "kwargs": resolved}))  # a checkpoint's view
    assert recorded["kwargs"] == resolved
    a = build(name, shape=(3, 32, 32), **SMALL[name])
    b = build(recorded["name"], shape=(3, 32, 32), **recorded["kwargs"])
    assert n_params(a) == n_params(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resolve_kwargs_fills_defaults_and_normalises_types():
    assert resolve_kwargs("preresnet", depth=20) == {"depth": 20, "width": 16}
    resolved = resolve_kwargs("vgg16", width_factor=1)
    assert resolved == {"batchnorm": True, "width_factor": 1.0}
    assert type(resolved["width_factor"]) is float


# ----------------------------------------------------------------------------------------
# Forward passes and gradients


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(SMALL))
def test_every_model_maps_every_data_set_to_logits(name, shape, classes):
    model = build(name, shape=shape, classes=classes, **SMALL[name])
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["digits", "cifar"])
@pytest.mark.parametrize("name", list(SMALL))
def test_every_parameter_takes_part_in_the_forward_pass(name, shape):
    model = build(name, shape=shape, **SMALL[name])
    model(torch.randn(4, *shape)).logsumexp(1).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert unused == []


def test_logreg_is_an_affine_map_of_the_flattened_image():
    model = build("logreg", shape=(1, 28, 28))
    x = torch.randn(5, 1, 28, 28)
    w, b = model.fc.weight, model.fc.bias
    torch.testing.assert_close(model(x), x.reshape(5, 784) @ w.T + b)


def test_mlp_of_depth_zero_is_logistic_regression():
    logreg, mlp = build("logreg", shape=(1, 8, 8)), build("mlp", shape=(1, 8, 8), depth=0)
    assert n_params(mlp) == n_params(logreg) == 650
    mlp.head.load_state_dict(logreg.fc.state_dict())
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(mlp(x), logreg(x))


def test_mlp_applies_relu_between_layers():
    model = build("mlp", shape=(1, 8, 8), width=8, depth=1)
    x = torch.randn(6, 1, 8, 8)
    hidden = torch.relu(x.flatten(1) @ model.hidden[0].weight.T + model.hidden[0].bias)
    torch.testing.assert_close(model(x), model.head(hidden))


# ----------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("classes", [10, 100])
def test_logreg_has_d_times_c_plus_c_parameters(shape, classes):
    d = math.prod(shape)
    assert n_params(build("logreg", shape=shape, classes=classes)) == d * classes + classes


@pytest.mark.parametrize("width, depth", [(64, 1), (10, 2), (100, 3), (7, 0)])
@pytest.mark.parametrize("shape", SHAPES)
def test_mlp_parameter_count_formula(shape, width, depth):
    d, c = math.prod(shape), 10
    if depth == 0:
        expected = (d + 1) * c
    else:
        expected = (d + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * c
    assert n_params(build("mlp", shape=shape, classes=c, width=width, depth=depth)) == expected


def test_default_mlp_on_mnist_is_the_784_64_10_network_of_50890_parameters():
    assert n_params(build("mlp", shape=(1, 28, 28))) == 50_890


def test_cnn_parameter_count_formula():
    c = 16
    conv1, conv2, fc = (1 * 9 + 1) * c, (c * 9 + 1) * 2 * c, (2 * c + 1) * 10
    assert n_params(build("cnn", shape=(1, 28, 28))) == conv1 + conv2 + fc
    # BatchNorm adds a scale and a shift per channel
    assert (
        n_params(build("cnn", shape=(1, 28, 28), batchnorm=True)) == conv1 + conv2 + fc + 2 * 3 * c
    )


def test_vgg16_parameter_counts_match_the_cifar_vgg16():
    # 14,728,266 is the well-known count of CIFAR-10 VGG-16-BN with one 512 -> 10 head.
    assert n_params(build("vgg16", shape=(3, 32, 32), classes=10)) == 14_728_266
    bn = 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)
    assert (
        n_params(build("vgg16", shape=(3, 32, 32), classes=10, batchnorm=False)) == 14_728_266 - bn
    )
    assert n_params(build("vgg16", shape=(3, 32, 32), classes=100)) == 14_728_266 + 90 * 513


@pytest.mark.parametrize("shape, pools", [((1, 8, 8), 3), ((1, 28, 28), 4), ((3, 32, 32), 5)])
def test_vgg16_skips_max_pools_once_the_feature_map_is_one_pixel(shape, pools):
    model = build("vgg16", shape=shape, width_factor=0.125)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert len(model.features) == 13 * 3 + 5  # conv, BN, ReLU per conv; a pool or identity per "M"


def _preresnet_params(depth: int, width: int, in_channels: int, classes: int) -> int:
    """Independent count: conv weights k*k*c_in*c_out, BN 2 per channel, no conv bias."""
    bottleneck = depth >= 44
    n = (depth - 2) // (9 if bottleneck else 6)
    e = 4 if bottleneck else 1
    total, c_in = 9 * in_channels * width, width
    for planes in (width, 2 * width, 4 * width):
        for _ in range(n):
            if bottleneck:
                # BN-conv1x1, BN-conv3x3, BN-conv1x1 to 4 * planes
                total += 2 * c_in + c_in * planes + 2 * planes
                total += 9 * planes * planes + 2 * planes + planes * 4 * planes
            else:
                total += 2 * c_in + 9 * c_in * planes + 2 * planes + 9 * planes * planes
            if c_in != planes * e:  # projection shortcut (also where the stride is 2)
                total += c_in * planes * e
            c_in = planes * e
    return total + 2 * c_in + (c_in + 1) * classes


def test_preresnet_parameter_counts():
    # PreResNet-20 (basic blocks): the 0.27M parameters of the ResNet paper's CIFAR net.
    assert n_params(build("preresnet", shape=(3, 32, 32), depth=20)) == 272_282
    assert _preresnet_params(20, 16, 3, 10) == 272_282
    # PreResNet-110 (12 bottlenecks per stage), the paper's CIFAR-100 model.
    model = build("preresnet", shape=(3, 32, 32), classes=100)
    assert n_params(model) == _preresnet_params(110, 16, 3, 100) == 1_169_972
    assert (
        sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 1 + 3 * 12 * 3 + 3
    )  # + 3 projections


def test_wrn_28_10_has_the_published_36_5m_parameters():
    # 36,479,194 parameters for CIFAR-10 (Zagoruyko & Komodakis report 36.5M).
    assert n_params(build("wrn", shape=(3, 32, 32), classes=10)) == 36_479_194
    assert n_params(build("wrn", shape=(3, 32, 32), classes=100)) == 36_479_194 + 90 * 641


def test_wrn_has_no_dropout_by_default_and_dropout_when_asked():
    model = build("wrn", shape=(3, 32, 32), depth=10, widen=2)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model = build("wrn", shape=(3, 32, 32), depth=10, widen=2, dropout=0.3)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 3 and all(
        m.p == 0.3 for m in dropouts
    )  # one per block, 1 block per stage


# ----------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("name", list(SMALL))
def test_same_seed_gives_identical_weights_and_another_seed_does_not(name):
    a, b = build(name, seed=0, **SMALL[name]), build(name, seed=0, **SMALL[name])
    c = build(name, seed=1, **SMALL[name])
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), k
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


# ----------------------------------------------------------------------------------------
# Fan-ins for the rank bound


def test_fan_ins_of_logreg():
    assert layer_fan_ins(build("logreg", shape=(1, 8, 8))) == [
        LayerInfo("fc", "linear", 64, 10, True, 650)
    ]


def test_fan_ins_of_mlp():
    assert layer_fan_ins(build("mlp", shape=(1, 28, 28), width=10, depth=2)) == [
        LayerInfo("hidden.0", "linear", 784, 10, True, 7850),
        LayerInfo("hidden.1", "linear", 10, 10, True, 110),
        LayerInfo("head", "linear", 10, 10, True, 110),
    ]


def test_fan_ins_of_cnn_with_batchnorm():
    infos = layer_fan_ins(build("cnn", shape=(3, 32, 32), classes=100, batchnorm=True))
    assert [(i.kind, i.fan_in, i.neurons, i.has_bias, i.params) for i in infos] == [
        ("conv", 3 * 3 * 3, 16, True, 16 * 28),
        ("batchnorm", 1, 16, True, 32),
        ("conv", 16 * 3 * 3, 32, True, 32 * 145),
        ("batchnorm", 1, 32, True, 64),
        ("linear", 32, 100, True, 3300),
    ]


@pytest.mark.parametrize("batchnorm", [True, False])
def test_fan_ins_of_vgg16(batchnorm):
    infos = layer_fan_ins(build("vgg16", shape=(3, 32, 32), batchnorm=batchnorm))
    convs = [i for i in infos if i.kind == "conv"]
    assert [i.fan_in for i in convs] == [27, 576, 576, 1152, 1152, 2304, 2304, 2304] + [4608] * 5
    assert [i.neurons for i in convs] == [
        64,
        64,
        128,
        128,
        256,
        256,
        256,
        512,
        512,
        512,
        512,
        512,
        512,
    ]
    assert sum(i.kind == "batchnorm" for i in infos) == (13 if batchnorm else 0)
    assert infos[-1] == LayerInfo("classifier", "linear", 512, 10, True, 5130)


@pytest.mark.parametrize("name", list(SMALL))
def test_fan_ins_account_for_every_parameter(name):
    model = build(name, shape=(3, 32, 32), **SMALL[name])
    infos = layer_fan_ins(model)
    assert sum(i.params for i in infos) == n_params(model)
    assert all(i.params == i.neurons * (i.fan_in + i.has_bias) for i in infos)
    assert {i.kind for i in infos} <= {"linear", "conv", "batchnorm"}


def test_resnet_convs_have_no_bias_and_shortcuts_are_counted_as_convs():
    infos = layer_fan_ins(build("preresnet", shape=(3, 32, 32), depth=20))
    assert not any(i.has_bias for i in infos if i.kind == "conv")
    shortcuts = [i for i in infos if i.name.endswith("shortcut")]
    assert [(i.fan_in, i.neurons) for i in shortcuts] == [(16, 32), (32, 64)]  # 1x1 convs


def test_fan_ins_refuse_layers_they_cannot_count():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(FlatcliError, match="LayerNorm"):
        layer_fan_ins(model)
    # parameter-free layers and affine-free BatchNorm are skipped
    # a grouped convolution sees in_channels / groups channels per neuron
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    assert layer_fan_ins(model) == [LayerInfo("0", "conv", 9, 4, True, 40)]
