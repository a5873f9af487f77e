"""The weight-scale mechanism and the measures that see through it.

Specification (every check numerical, against torch.func.hessian where a Hessian is
involved, in float64):
(a) logistic regression: scaling the weights by a > 1 on correctly classified data
    lowers the loss and the exact Hessian trace (the paper's mechanism);
(b) moving a scale between two ReLU layers keeps the function and the loss but changes
    the Hessian's trace and lambda_max; adaptive sharpness (same seed) and relative
    flatness of the output layer do not change; a per-neuron rescaling still leaves
    adaptive sharpness unchanged but changes relative flatness;
(c) scaling a layer that feeds a BatchNorm (with its normalising statistics) keeps the
    loss, divides that layer's Hessian block by a^2 and keeps adaptive sharpness;
(d) logit-normalised adaptive sharpness is invariant to scaling a logistic regression;
(e) the closed form of relative flatness equals the Hessian computation;
(f) the Monte Carlo standard error of adaptive sharpness shrinks as 1/sqrt(samples)
    and the value lies within 4 standard errors of a large-sample reference.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from flatcli.analysis.measures import measure
from flatcli.analysis.scale import (
    adaptive_sharpness,
    eval_mode,
    normalise_logits,
    relative_flatness,
    scale_weights,
)
from flatcli.config import SharpnessConfig
from flatcli.curvature.trace import MIN_SAMPLES
from flatcli.errors import UsageError
from flatcli.models import build_model
from flatcli.workflows.data import load_dataset

C = 10
TIGHT = 1e-9  # relative tolerance for identities that hold up to float64 rounding


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("digits", "train").tensors
    return x[:200].double(), y[:200]


def train(model, x, y, steps=300, lr=0.05):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_logreg(digits):
    torch.manual_seed(0)
    return train(build_model("logreg", input_shape=(1, 8, 8), num_classes=C).double(), *digits)


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    return train(
        build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=16).double(), *digits
    )


def loss_of(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def hessian_of(model, x, y, names=None):
    """Dense Hessian of the mean cross-entropy w.r.t. the named parameters (all by default)."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(w):
        chosen = {
            n: t.view(s) for n, s, t in zip(names, shapes, torch.split(w, sizes), strict=True)
        }
        return F.cross_entropy(functional_call(model, chosen, (x,)), y)

    return hessian(loss)(w0)


def logreg_trace(model, x):
    """Tr H = (1/N) sum_i ||x~_i||^2 (1 - ||p_i||^2) (Granziol 2020, logistic regression)."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
        return ((x.flatten(1).pow(2).sum(1) + 1) * (1 - p.pow(2).sum(1))).mean().item()


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b))


# ------------------------------------------------------------------ scale_weights


def test_scale_weights_copies_and_scales_the_selection():
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=4)
    before = copy.deepcopy(model.state_dict())
    for layers, scaled_names in [
        ("all", {"hidden.0.weight", "hidden.0.bias", "head.weight", "head.bias"}),
        ("last", {"head.weight", "head.bias"}),
        ("hidden.0", {"hidden.0.weight", "hidden.0.bias"}),
    ]:
        out = scale_weights(model, 3.0, layers=layers)
        for name, p in out.named_parameters():
            factor = 3.0 if name in scaled_names else 1.0
            assert torch.equal(p, factor * before[name]), (layers, name)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    with pytest.raises(UsageError):
        scale_weights(model, 2.0, layers="nope")
    with pytest.raises(UsageError):
        scale_weights(model, -1.0)


def test_bias_free_relu_net_is_homogeneous_of_degree_L_and_biases_break_it(digits):
    x, _ = digits
    torch.manual_seed(0)
    bias_free = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, C, bias=False)
    ).double()
    with torch.no_grad():
        assert torch.allclose(
            scale_weights(bias_free, 2.0)(x), 4.0 * bias_free(x), rtol=1e-12, atol=0
        )
        torch.manual_seed(0)
        biased = build_model("mlp", input_shape=(1, 8, 8), num_classes=C, width=16).double()
        assert not torch.allclose(scale_weights(biased, 2.0)(x), 4.0 * biased(x), rtol=1e-3)


def test_normalised_measures_multiply_by_the_squared_weight_norm(trained_logreg, digits):
    x, y = digits
    names = ("lambda_max", "trace", "lambda_max_normalised", "trace_normalised")
    report = measure(
        trained_logreg, x, y, SharpnessConfig(measures=names, exact=True, dtype="float64")
    )
    h = hessian_of(trained_logreg, x, y)
    w2 = sum(float(p.detach().pow(2).sum()) for p in trained_logreg.parameters())
    lam, tr = torch.linalg.eigvalsh(h)[-1].item(), torch.trace(h).item()
    got = {k: report.measures[k].value for k in names}
    assert got == pytest.approx(
        {
            "lambda_max": lam,
            "trace": tr,
            "lambda_max_normalised": lam * w2,
            "trace_normalised": tr * w2,
        },
        rel=1e-9,
    )


# ------------------------------------------------------------------ (a) the mechanism


def test_a_scaling_a_logreg_up_lowers_loss_and_exact_trace(trained_logreg, digits):
    x, y = digits
    with torch.no_grad():
        assert (trained_logreg(x).argmax(1) == y).all()  # precondition: well classified
    losses, traces = [], []
    for a in (1.0, 2.0, 4.0):
        model = scale_weights(trained_logreg, a)
        with torch.no_grad():
            assert torch.allclose(model(x), a * trained_logreg(x), rtol=1e-12, atol=1e-12)
        losses.append(loss_of(model, x, y))
        traces.append(logreg_trace(model, x))
        assert traces[-1] == pytest.approx(torch.trace(hessian_of(model, x, y)).item(), rel=1e-10)
    assert losses[0] > losses[1] > losses[2]
    assert traces[0] > traces[1] > traces[2]
    assert traces[2] < 0.5 * traces[0]


# ------------------------------------------------------- (b) rescaling between ReLU layers


def _move_scale(model, a):
    """Layer 1 (weight and bias) times a, output layer weight divided by a."""
    moved = scale_weights(model, a, layers="hidden.0")
    with torch.no_grad():
        moved.head.weight.div_(a)
    return moved


def test_b_moving_scale_between_relu_layers(trained_mlp, digits):
    x, y = digits
    a = 4.0
    moved = _move_scale(trained_mlp, a)
    assert rel(loss_of(moved, x, y), loss_of(trained_mlp, x, y)) < TIGHT

    # raw Hessian: not invariant
    h0, h1 = hessian_of(trained_mlp, x, y), hessian_of(moved, x, y)
    assert rel(torch.trace(h0).item(), torch.trace(h1).item()) > 0.1
    lam0, lam1 = torch.linalg.eigvalsh(h0)[-1].item(), torch.linalg.eigvalsh(h1)[-1].item()
    assert rel(lam0, lam1) > 0.1

    # adaptive sharpness: w + rho |w| eps maps to the rescaled w + rho |w| eps, draw by draw
    s0 = adaptive_sharpness(trained_mlp, x, y, samples=32, seed=3)
    s1 = adaptive_sharpness(moved, x, y, samples=32, seed=3)
    assert s0.value > 0 and rel(s0.value, s1.value) < TIGHT and rel(s0.stderr, s1.stderr) < 1e-6

    # relative flatness of the output layer: <w_s, w_s'> scales 1/a^2, ||phi||^2 scales a^2
    assert rel(relative_flatness(trained_mlp, x, y), relative_flatness(moved, x, y)) < TIGHT


def test_b_per_neuron_rescaling_keeps_adaptive_sharpness_but_not_relative_flatness(
    trained_mlp, digits
):
    x, y = digits
    scales = torch.exp(
        torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    moved = copy.deepcopy(trained_mlp)
    with torch.no_grad():
        moved.hidden[0].weight.mul_(scales[:, None])
        moved.hidden[0].bias.mul_(scales)
        moved.head.weight.div_(scales[None, :])
    assert rel(loss_of(moved, x, y), loss_of(trained_mlp, x, y)) < TIGHT
    s0 = adaptive_sharpness(trained_mlp, x, y, samples=16, seed=1).value
    assert rel(s0, adaptive_sharpness(moved, x, y, samples=16, seed=1).value) < TIGHT
    assert rel(relative_flatness(trained_mlp, x, y), relative_flatness(moved, x, y)) > 0.1


# ----------------------------------------------------------- (c) a layer feeding BatchNorm


def test_c_scaling_a_layer_that_feeds_batchnorm(digits):
    x, y = digits
    torch.manual_seed(0)
    model = build_model(
        "cnn", input_shape=(1, 8, 8), num_classes=C, channels=2, batchnorm=True
    ).double()
    bn = model.features[1]
    bn.momentum = None  # running statistics = statistics of the pass below
    with torch.no_grad():
        model.train()(x)
    model.eval()
    bn.eps = 0.0  # the identity L(a w) = L(w) ignores BatchNorm's eps (allowed in eval mode)

    a = 3.0
    scaled = scale_weights(model, a, layers="features.0")
    # eval mode normalises with running statistics: they must follow the scale
    with torch.no_grad():
        assert not torch.allclose(scaled(x), model(x), rtol=1e-2)
        scaled.features[1].running_mean.mul_(a)
        scaled.features[1].running_var.mul_(a * a)
        assert torch.allclose(scaled(x), model(x), rtol=1e-12, atol=1e-12)
    assert rel(loss_of(scaled, x, y), loss_of(model, x, y)) < TIGHT

    block = ["features.0.weight", "features.0.bias"]
    h0, h1 = hessian_of(model, x, y, block), hessian_of(scaled, x, y, block)
    assert torch.allclose(h1, h0 / a**2, rtol=1e-8, atol=1e-12 * h0.abs().max().item())

    s0 = adaptive_sharpness(model, x, y, samples=16, seed=0).value
    assert rel(s0, adaptive_sharpness(scaled, x, y, samples=16, seed=0).value) < TIGHT


# ---------------------------------------------------------------- (d) logit normalisation


def test_d_logit_normalised_adaptive_sharpness_ignores_a_logreg_scale(trained_logreg, digits):
    x, y = digits
    big = scale_weights(trained_logreg, 3.0)
    raw0 = adaptive_sharpness(trained_logreg, x, y, samples=16, seed=0).value
    raw1 = adaptive_sharpness(big, x, y, samples=16, seed=0).value
    assert rel(raw0, raw1) > 0.1  # plain adaptive sharpness sees the logit scale
    n0 = adaptive_sharpness(trained_logreg, x, y, samples=16, seed=0, logit_normalise=True)
    n1 = adaptive_sharpness(big, x, y, samples=16, seed=0, logit_normalise=True)
    assert n0.logit_normalise and rel(n0.value, n1.value) < TIGHT
    assert rel(n0.base_loss, n1.base_loss) < TIGHT


def test_normalised_logits_are_centred_unit_vectors():
    z = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = normalise_logits(z)
    assert torch.allclose(out[0].sum(), torch.tensor(0.0, dtype=torch.float64), atol=1e-15)
    assert out[0].norm().item() == pytest.approx(1.0)
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))  # no division by 0
    assert torch.allclose(normalise_logits(7.0 * z), out)


# -------------------------------------------------------- (e) relative flatness closed form


@pytest.mark.parametrize("fixture", ["trained_logreg", "trained_mlp"])
def test_e_relative_flatness_closed_form_equals_hessian(fixture, digits, request):
    model = request.getfixturevalue(fixture)
    x, y = digits
    name, linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    w = linear.weight.detach()
    h = hessian_of(model, x, y, [f"{name}.weight"]).reshape(*w.shape, *w.shape)  # (C, d, C, d)
    trace_blocks = torch.einsum("sktk->st", h)  # Tr(H_{s,s'})
    reference = ((w @ w.T) * trace_blocks).sum().item()
    assert relative_flatness(model, x, y) == pytest.approx(reference, rel=1e-10)
    assert relative_flatness(model, x, y, batch_size=64) == pytest.approx(reference, rel=1e-10)


def test_relative_flatness_refuses_a_layer_that_is_not_the_output(trained_mlp, digits):
    with pytest.raises(UsageError, match="logits"):
        relative_flatness(trained_mlp, *digits, layer="hidden.0")


# -------------------------------------------------------------- (f) Monte Carlo behaviour


def test_f_adaptive_sharpness_error_bar_is_honest(trained_mlp, digits):
    x, y = digits
    small = adaptive_sharpness(trained_mlp, x, y, samples=16, seed=0)
    mid = adaptive_sharpness(trained_mlp, x, y, samples=256, seed=1)
    assert mid.stderr < 0.5 * small.stderr  # 1/sqrt(16) ideal: 0.25
    reference = adaptive_sharpness(trained_mlp, x, y, samples=2048, seed=2)
    for est in (small, mid):
        assert abs(est.value - reference.value) <= 4 * math.hypot(est.stderr, reference.stderr)
    assert reference.value > 10 * reference.stderr  # the measure is resolved, not noise


def test_adaptive_sharpness_is_seeded_batched_and_leaves_the_model_alone(trained_mlp, digits):
    x, y = digits
    model = copy.deepcopy(trained_mlp).train()
    state = copy.deepcopy(model.state_dict())
    a = adaptive_sharpness(model, x, y, samples=8, seed=5)
    b = adaptive_sharpness(model, x, y, samples=8, seed=5, batch_size=64)
    c = adaptive_sharpness(model, x, y, samples=8, seed=6)
    assert rel(a.value, b.value) < 1e-12 and a.value != c.value
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_adaptive_sharpness_is_an_estimate_with_a_standard_error(trained_mlp, digits):
    x, y = digits
    few = adaptive_sharpness(trained_mlp, x, y, samples=MIN_SAMPLES - 1, seed=0)
    enough = adaptive_sharpness(trained_mlp, x, y, samples=MIN_SAMPLES, seed=0)
    for est, converged in ((few, False), (enough, True)):
        assert est.estimate.kind == "stderr" and est.estimate.converged is converged
        assert (est.value, est.stderr) == (est.estimate.value, est.estimate.uncertainty)
    assert few.base_loss == pytest.approx(loss_of(trained_mlp, x, y), rel=1e-12)
    assert few.samples == MIN_SAMPLES - 1 and few.rho == 0.05 and few.seed == 0


def test_adaptive_sharpness_is_the_documented_monte_carlo_mean(trained_mlp, digits):
    # draws: eps ~ N(0, 1) per entry, parameters in named_parameters order, one generator
    x, y = digits
    gen = torch.Generator().manual_seed(7)
    base = loss_of(trained_mlp, x, y)
    diffs = []
    for _ in range(3):
        noisy = {
            n: p.detach()
            + 0.1 * p.detach().abs() * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            for n, p in trained_mlp.named_parameters()
        }
        with torch.no_grad():
            diffs.append(
                F.cross_entropy(functional_call(trained_mlp, noisy, (x,)), y).item() - base
            )
    d = torch.tensor(diffs, dtype=torch.float64)
    est = adaptive_sharpness(trained_mlp, x, y, rho=0.1, samples=3, seed=7)
    assert est.value == pytest.approx(d.mean().item(), rel=1e-9)
    assert est.stderr == pytest.approx(d.std().item() / math.sqrt(3), rel=1e-6)


def test_eval_mode_restores_every_modules_own_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2)).train()
    model[1].eval()  # a mix of flags
    flags = [m.training for m in model.modules()]
    with eval_mode(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert [m.training for m in model.modules()] == flags
