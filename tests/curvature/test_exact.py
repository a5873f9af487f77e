"""Dense references and closed forms: dense_hessian follows the operator's semantics and
equals torch.func.hessian; it refuses what would not fit; the logistic-regression
Hessian and trace in closed form equal autograd's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from flatcli.curvature import (
    CurvatureOperator,
    dense_hessian,
    dense_spectrum,
    exact_spectrum,
    hessian_via_torch_func,
    logistic_regression_hessian,
    logistic_regression_trace,
)
from flatcli.errors import FlatcliError, TooLargeError

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def test_dense_hessian_equals_torch_func_hessian(problem, reference_hessian) -> None:
    op = CurvatureOperator(problem.model, problem.inputs, problem.targets, dtype=F64)
    dense = dense_hessian(op, block_size=50)
    torch.testing.assert_close(dense, reference_hessian(problem), **TOL)
    torch.testing.assert_close(dense, dense.T, **TOL)


def test_dense_hessian_follows_the_operator_options(make_problem, reference_hessian) -> None:
    problem = make_problem("bn_mlp", "digits")
    first = next(iter(dict(problem.model.named_parameters())))
    op = CurvatureOperator(
        problem.model,
        problem.inputs,
        problem.targets,
        dtype=F64,
        l2=0.5,
        param_names=[first],
        bn_mode="batch",
    )
    n = problem.model[0].weight.numel()
    expected = reference_hessian(problem, "batch")[:n, :n] + 0.5 * torch.eye(n, dtype=F64)
    torch.testing.assert_close(dense_hessian(op), expected, **TOL)


def test_exact_spectrum_is_ascending_float64_eigvalsh(make_problem, reference_hessian) -> None:
    problem = make_problem("cnn", "digits")
    op = CurvatureOperator(problem.model, problem.inputs, problem.targets)  # float32
    spectrum = exact_spectrum(op)
    assert spectrum.dtype == F64 and spectrum.shape == (op.num_params,)
    assert (spectrum[1:] >= spectrum[:-1]).all()
    expected = torch.linalg.eigvalsh(reference_hessian(problem))
    assert (spectrum - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_dense_spectrum_is_that_of_the_symmetrised_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=gen, dtype=torch.float32)  # not symmetric, float32
    eig = dense_spectrum(a)
    expected = np.linalg.eigvalsh((a.double().numpy() + a.double().numpy().T) / 2)
    assert eig.dtype == F64 and eig.device.type == "cpu"
    np.testing.assert_allclose(eig.numpy(), expected, rtol=1e-12, atol=1e-12)
    # one triangle alone (what eigvalsh of the raw matrix reads) gives another spectrum
    assert not np.allclose(torch.linalg.eigvalsh(a.double()).numpy(), expected, atol=1e-3)


def test_too_large_dense_hessians_are_refused_with_their_size(make_problem) -> None:
    problem = make_problem("mlp_tanh", "digits")  # P = 460: 8 * 460^2 bytes = 1.6 MiB
    op = CurvatureOperator(problem.model, problem.inputs, problem.targets)
    with pytest.raises(TooLargeError, match=r"460 parameters needs 0\.00 GiB") as info:
        dense_hessian(op, max_bytes=1_000_000)
    assert info.value.hint and isinstance(info.value, FlatcliError)
    assert op.hvps == 0  # refused before any work
    with pytest.raises(TooLargeError):
        exact_spectrum(op, max_bytes=1_000_000)
    with pytest.raises(TooLargeError):
        hessian_via_torch_func(problem.model, problem.inputs, problem.targets, max_bytes=1_000_000)
    linear = make_problem("logreg", "digits").model
    with pytest.raises(TooLargeError, match="650 parameters"):
        logistic_regression_hessian(linear.weight, linear.bias, problem.inputs, max_bytes=1_000_000)


def test_default_limit_refuses_a_large_model() -> None:
    # P = 7850 (logistic regression on MNIST) fits in 2 GiB; P = 20,000 does not
    big = CurvatureOperator(nn.Linear(1999, 10), torch.randn(2, 1999), torch.tensor([0, 1]))
    assert big.num_params == 20_000
    with pytest.raises(TooLargeError, match="2.98 GiB"):
        dense_hessian(big)


def hand_written_bn_cnn_reference(problem) -> torch.Tensor:
    """torch.func.hessian of Conv -> BatchNorm2d (batch statistics) -> ReLU -> MaxPool ->
    Linear written with functional ops, for a check of hessian_via_torch_func's
    decomposed BatchNorm.
    """
    model = problem.model
    shapes = [p.shape for p in model.parameters()]
    x = problem.inputs.to(F64)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        cw, cb, g, b, lw, lb = (
            t.reshape(s)
            for t, s in zip(flat.split([s.numel() for s in shapes]), shapes, strict=True)
        )
        h = F.conv2d(x, cw, cb)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        h = (h - mean) / torch.sqrt(var + model[1].eps) * g[None, :, None, None] + b[
            None, :, None, None
        ]
        h = F.max_pool2d(F.relu(h), 2).flatten(1)
        return F.cross_entropy(h @ lw.T + lb, problem.targets)

    theta = torch.cat([p.detach().to(F64).reshape(-1) for p in model.parameters()])
    return hessian(loss)(theta)


@pytest.mark.parametrize("dataset", ["random", "digits"])
def test_reference_with_batch_statistics_equals_a_hand_written_network(
    make_problem, dataset: str
) -> None:
    problem = make_problem("bn_cnn", dataset)
    reference = hessian_via_torch_func(
        problem.model, problem.inputs, problem.targets, bn_mode="batch"
    )
    torch.testing.assert_close(reference, hand_written_bn_cnn_reference(problem), **TOL)
    torch.testing.assert_close(reference, reference.T, **TOL)


# ------------------------------------------------------------- logistic regression


def logistic_problem(make_problem, dataset: str, bias: bool, scale: float = 1.0):
    problem = make_problem("logreg", dataset)
    weight = scale * problem.model.weight.detach().to(F64)
    b = scale * problem.model.bias.detach().to(F64) if bias else None
    return problem, weight, b


def autograd_logistic_hessian(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias
) -> torch.Tensor:
    c, d = weight.shape
    x = x.to(F64)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w = flat[: c * d].reshape(c, d)
        logits = x @ w.T + (flat[c * d :] if bias is not None else 0)
        return F.cross_entropy(logits, y)

    theta = torch.cat([weight.reshape(-1)] + ([bias] if bias is not None else []))
    return hessian(loss)(theta)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dataset", ["random", "digits"])
@pytest.mark.parametrize("scale", [1.0, 8.0])  # 8x: confident predictions, a smaller H
def test_closed_form_logistic_regression_hessian_equals_autograd(
    make_problem, dataset: str, bias: bool, scale: float
) -> None:
    problem, weight, b = logistic_problem(make_problem, dataset, bias, scale)
    closed = logistic_regression_hessian(weight, b, problem.inputs, problem.targets)
    torch.testing.assert_close(
        closed, autograd_logistic_hessian(problem.inputs, problem.targets, weight, b), **TOL
    )
    trace = logistic_regression_trace(weight, b, problem.inputs, problem.targets)
    assert trace == pytest.approx(float(torch.trace(closed)), rel=1e-12)


@pytest.mark.parametrize("dataset", ["random", "digits"])
def test_closed_form_matches_the_operator_ordering(
    make_problem, reference_hessian, dataset: str
) -> None:
    problem = make_problem("logreg", dataset)
    weight, bias = problem.model.weight.detach().to(F64), problem.model.bias.detach().to(F64)
    torch.testing.assert_close(
        logistic_regression_hessian(weight, bias, problem.inputs), reference_hessian(problem), **TOL
    )


def test_logistic_hessian_rank_is_classes_minus_one_times_inputs_plus_one(make_problem) -> None:
    # random data, d = 5, C = 3, N = 37: rank H = (C - 1)(d + 1) = 12 of P = 18
    problem, weight, bias = logistic_problem(make_problem, "random", True)
    closed = logistic_regression_hessian(weight, bias, problem.inputs)
    assert torch.linalg.matrix_rank(closed, hermitian=True).item() == 12


def test_logistic_measures_shrink_as_weights_grow_along_a_separating_direction(
    make_problem,
) -> None:
    # the paper's claim 1 in its simplest form: scaling a correct classifier flattens H
    problem, weight, bias = logistic_problem(make_problem, "digits", True)
    fitted = nn.Linear(64, 10).double()
    opt = torch.optim.LBFGS(fitted.parameters(), max_iter=100)
    x, y = problem.inputs.to(F64), problem.targets

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(fitted(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert (fitted(x).argmax(1) == y).all()  # 200 digits are linearly separable
    w, b = fitted.weight.detach(), fitted.bias.detach()
    traces = [logistic_regression_trace(a * w, a * b, x) for a in (1.0, 2.0, 4.0)]
    assert traces[0] > traces[1] > traces[2]
