"""CurvatureOperator: H V in one data pass, against dense float64 references.

References: torch.func.hessian of the flattened-parameter loss (conftest), a densely
built J^T (diag p - p p^T) J / N for the GGN, and a hand-written BatchNorm forward for
batch statistics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from flatcli.curvature import AUTO_METHOD, CurvatureOperator, hessian_via_torch_func
from flatcli.errors import FlatcliError, UsageError

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
METHODS = ("double_backward", "forward_over_reverse")


def op_for(problem, **kwargs) -> CurvatureOperator:
    kwargs.setdefault("dtype", F64)
    return CurvatureOperator(problem.model, problem.inputs, problem.targets, **kwargs)


def random_block(num_params: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_params, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", METHODS)
def test_block_product_equals_dense_hessian_times_block(
    problem, method: str, reference_hessian
) -> None:
    op = op_for(problem, method=method)
    v = random_block(op.num_params, 5)
    torch.testing.assert_close(op.matmat(v), reference_hessian(problem) @ v, **TOL)


def test_block_product_equals_single_products(problem) -> None:
    op = op_for(problem)
    v = random_block(op.num_params, 4, seed=1)
    block = op.matmat(v)
    singles = torch.stack([op.matvec(v[:, i]) for i in range(4)], dim=1)
    torch.testing.assert_close(block, singles, **TOL)


def test_both_hvp_methods_agree_in_every_bn_mode(problem) -> None:
    modes = ("eval", "batch") if problem.has_batch_norm else ("eval",)
    v = random_block(problem.num_params, 3, seed=2)
    for bn_mode in modes:
        a = op_for(problem, bn_mode=bn_mode, method="double_backward").matmat(v)
        b = op_for(problem, bn_mode=bn_mode, method="forward_over_reverse").matmat(v)
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", ["mlp_relu", "bn_cnn"])
def test_batches_weighted_exactly_when_n_is_not_a_multiple_of_batch_size(
    kind: str, make_problem
) -> None:
    problem = make_problem(kind, "digits")  # N = 200
    full = op_for(problem)
    batched = op_for(problem, batch_size=64)  # 64 + 64 + 64 + 8
    v = random_block(full.num_params, 3)
    torch.testing.assert_close(batched.matmat(v), full.matmat(v), **TOL)
    torch.testing.assert_close(batched.gradient(), full.gradient(), **TOL)
    for a, b in zip(batched.loss_and_accuracy(), full.loss_and_accuracy(), strict=True):
        assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_chunked_vmap_and_the_loop_give_the_same_block(make_problem, method: str) -> None:
    problem = make_problem("cnn", "random")
    v = random_block(problem.num_params, 7)
    whole = op_for(problem, method=method).matmat(v)
    torch.testing.assert_close(op_for(problem, method=method, chunk_size=3).matmat(v), whole, **TOL)
    torch.testing.assert_close(
        op_for(problem, method=method, chunk_size=1).matmat(v), whole, **TOL
    )  # loop
    ggn = op_for(problem, curvature="ggn").matmat(v)
    torch.testing.assert_close(op_for(problem, curvature="ggn", chunk_size=2).matmat(v), ggn, **TOL)
    torch.testing.assert_close(op_for(problem, curvature="ggn", chunk_size=1).matmat(v), ggn, **TOL)


def dense_ggn(problem, bn_mode: str) -> torch.Tensor:
    """(1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i with J from torch.func.jacrev."""
    op = op_for(problem, bn_mode=bn_mode)
    x = problem.inputs.to(F64)
    jac = jacrev(lambda t: op._logits(t, x))(op.params)  # (N, C, P)
    with torch.no_grad():
        p = torch.softmax(op._logits(op.params, x), dim=1)
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, a, jac) / x.shape[0]


def test_ggn_equals_dense_jacobian_form(problem) -> None:
    for bn_mode in ("eval", "batch") if problem.has_batch_norm else ("eval",):
        op = op_for(problem, curvature="ggn", bn_mode=bn_mode)
        v = random_block(op.num_params, 4)
        torch.testing.assert_close(op.matmat(v), dense_ggn(problem, bn_mode) @ v, **TOL)


@pytest.mark.parametrize("dataset", ["random", "digits"])
def test_ggn_equals_hessian_for_logistic_regression(dataset: str, make_problem) -> None:
    # z is linear in w, so the residual term sum_c (p_c - y_c) d2z_c/dw2 vanishes
    problem = make_problem("logreg", dataset)
    v = random_block(problem.num_params, 3)
    torch.testing.assert_close(
        op_for(problem, curvature="ggn").matmat(v), op_for(problem).matmat(v), **TOL
    )


def test_ggn_differs_from_hessian_for_a_nonlinear_net(make_problem) -> None:
    problem = make_problem("mlp_tanh", "digits")
    v = random_block(problem.num_params, 2)
    diff = op_for(problem, curvature="ggn").matmat(v) - op_for(problem).matmat(v)
    assert diff.abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["mlp_tanh", "bn_cnn"])
def test_param_names_give_the_diagonal_block(kind: str, make_problem, reference_hessian) -> None:
    problem = make_problem(kind, "digits")
    names = [n for n, _ in problem.model.named_parameters()]
    chosen = [names[-2], names[0]]  # order in the flat vector follows param_names
    sizes = dict((n, p.numel()) for n, p in problem.model.named_parameters())
    offsets = dict(zip(names, np.cumsum([0] + [sizes[n] for n in names])[:-1], strict=True))
    index = torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in chosen])
    op = op_for(problem, param_names=chosen)
    assert op.param_names == tuple(chosen)
    assert op.num_params == index.numel()
    block = reference_hessian(problem)[index][:, index]
    v = random_block(op.num_params, 3)
    torch.testing.assert_close(op.matmat(v), block @ v, **TOL)


def test_l2_adds_l2_times_identity(make_problem) -> None:
    problem = make_problem("mlp_relu", "random")
    v = random_block(problem.num_params, 3)
    torch.testing.assert_close(
        op_for(problem, l2=0.25).matmat(v), op_for(problem).matmat(v) + 0.25 * v, **TOL
    )
    torch.testing.assert_close(
        op_for(problem, l2=0.25, curvature="ggn").matmat(v),
        op_for(problem, curvature="ggn").matmat(v) + 0.25 * v,
        **TOL,
    )


# -------------------------------------------------------------------- BatchNorm


def hand_written_bn_mlp_loss(problem, statistics: str):
    """Loss of Linear -> BatchNorm1d -> Tanh -> Linear written out by hand, for a flat
    parameter vector in named_parameters order; "batch" normalises with the biased
    statistics of the whole data, "running" with the model's running buffers.
    """
    model = problem.model
    bn = model[1]
    x = problem.inputs.to(F64)
    shapes = [p.shape for p in model.parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w1, b1, gamma, beta, w2, b2 = (
            t.reshape(s)
            for t, s in zip(flat.split([math.prod(s) for s in shapes]), shapes, strict=True)
        )
        h = x @ w1.T + b1
        if statistics == "batch":
            mean, var = h.mean(0), (h - h.mean(0)).pow(2).mean(0)
        else:
            mean, var = bn.running_mean.to(F64), bn.running_var.to(F64)
        h = (h - mean) / torch.sqrt(var + bn.eps) * gamma + beta
        return F.cross_entropy(torch.tanh(h) @ w2.T + b2, problem.targets)

    return loss


@pytest.mark.parametrize("dataset", ["random", "digits"])
def test_batch_mode_equals_hessian_of_the_loss_with_batch_statistics(
    dataset: str, make_problem
) -> None:
    problem = make_problem("bn_mlp", dataset)
    op = op_for(problem, bn_mode="batch")
    dense = hessian(hand_written_bn_mlp_loss(problem, "batch"))(op.params)
    v = random_block(op.num_params, 4)
    torch.testing.assert_close(op.matmat(v), dense @ v, **TOL)
    assert op.loss_and_accuracy()[0] == pytest.approx(
        float(hand_written_bn_mlp_loss(problem, "batch")(op.params)), rel=1e-12
    )


def test_eval_mode_uses_the_running_statistics(make_problem) -> None:
    problem = make_problem("bn_mlp", "digits")
    op = op_for(problem, bn_mode="eval")
    dense = hessian(hand_written_bn_mlp_loss(problem, "running"))(op.params)
    v = random_block(op.num_params, 4)
    torch.testing.assert_close(op.matmat(v), dense @ v, **TOL)
    batch = op_for(problem, bn_mode="batch").matmat(v)
    assert (batch - op.matmat(v)).abs().max() > 1e-3  # the modes differ on this model


def test_batch_mode_with_batches_is_the_weighted_mean_of_per_batch_hessians(make_problem) -> None:
    problem = make_problem("bn_cnn", "random")  # N = 37 -> 16 + 16 + 5
    op = op_for(problem, bn_mode="batch", batch_size=16)
    expected = torch.zeros(op.num_params, op.num_params, dtype=F64)
    for start in range(0, 37, 16):
        x, y = problem.inputs[start : start + 16], problem.targets[start : start + 16]
        expected += (x.shape[0] / 37) * hessian_via_torch_func(problem.model, x, y, bn_mode="batch")
    v = random_block(op.num_params, 3)
    torch.testing.assert_close(op.matmat(v), expected @ v, **TOL)


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
@pytest.mark.parametrize("kind", ["bn_mlp", "bn_cnn"])
def test_running_statistics_and_model_state_never_change(
    kind: str, bn_mode: str, make_problem
) -> None:
    problem = make_problem(kind, "digits")
    model = problem.model
    before = snapshot(model)
    flags = [m.training for m in model.modules()]
    v = random_block(problem.num_params, 2)
    for kwargs in (
        dict(method="double_backward"),
        dict(method="forward_over_reverse"),
        dict(curvature="ggn"),
    ):
        op = op_for(problem, bn_mode=bn_mode, batch_size=64, **kwargs)
        op.matmat(v)
        op.gradient()
        op.loss_and_accuracy()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # bit-identical, buffers included
        assert after[key].dtype == value.dtype
    assert [m.training for m in model.modules()] == flags
    assert model[1].running_mean is not None  # not replaced on the user's model


# --------------------------------------------------------------- everything else


def test_dtype_float64_on_a_float32_model_and_float32_close_to_it(make_problem) -> None:
    problem = make_problem("mlp_tanh", "digits")
    assert problem.model[0].weight.dtype == torch.float32
    op64 = op_for(problem, dtype=F64)
    op32 = op_for(problem, dtype=None)
    assert op64.dtype == F64 and op32.dtype == torch.float32 and op64.params.dtype == F64
    v = random_block(op64.num_params, 2)
    exact = op64.matmat(v)
    approx = op32.matmat(v.float())
    assert approx.dtype == torch.float32
    assert (approx.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert problem.model[0].weight.dtype == torch.float32  # the model is not converted


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("method", METHODS)
def test_a_float64_copy_applies_the_same_matrix_in_float64(
    make_problem, curvature: str, method: str
) -> None:
    problem = make_problem("mlp_tanh", "digits")
    op32 = op_for(problem, dtype=None, curvature=curvature, method=method)
    op64 = op_for(problem, dtype=F64, curvature=curvature, method=method)
    copy = op32.astype(F64)
    v = random_block(op64.num_params, 3)
    torch.testing.assert_close(copy.matmat(v), op64.matmat(v), **TOL)
    assert copy.hvps == 3 and op32.hvps == 0  # the copy counts its own products
    assert op32.matmat(v.float()).dtype == torch.float32  # the original is unchanged


def test_loss_accuracy_and_gradient_match_direct_computation(make_problem) -> None:
    problem = make_problem("cnn", "digits")
    op = op_for(problem, batch_size=48)
    model = problem.model
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    x = problem.inputs.double()
    logits = functional_call(model, params, (x,))
    assert op.loss_and_accuracy()[0] == pytest.approx(
        float(F.cross_entropy(logits, problem.targets)), rel=1e-12
    )
    accuracy = float((logits.argmax(1) == problem.targets).double().mean())
    assert op.loss_and_accuracy()[1] == pytest.approx(accuracy, rel=1e-12)
    theta = op.params.clone().requires_grad_(True)
    loss = F.cross_entropy(functional_call(model, op.unflatten(theta), (x,)), problem.targets)
    (expected,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(op.gradient(), expected, **TOL)


def test_hvp_count_and_progress_report_one_call_per_pass(make_problem) -> None:
    problem = make_problem("logreg", "random")
    seen: list[int] = []
    op = op_for(problem, batch_size=10, progress=seen.append)
    op.matmat(random_block(op.num_params, 5))
    op.matvec(random_block(op.num_params, 1)[:, 0])
    op.gradient()  # not a Hessian-vector product
    assert op.hvps == 6
    assert seen == [5, 6]


def test_unflatten_inverts_flatten_and_follows_named_parameters(make_problem) -> None:
    problem = make_problem("bn_cnn", "random")
    op = op_for(problem)
    parts = op.unflatten(op.params)
    assert list(parts) == [n for n, _ in problem.model.named_parameters()]
    for name, p in problem.model.named_parameters():
        torch.testing.assert_close(parts[name], p.detach().double(), rtol=0, atol=0)
    torch.testing.assert_close(op.flatten(parts), op.params, rtol=0, atol=0)


def test_to_scipy_is_a_float64_linear_operator(make_problem, reference_hessian) -> None:
    problem = make_problem("mlp_relu", "random")
    lin = op_for(problem, dtype=None).to_scipy()  # float32 operator, float64 interface
    v = np.random.default_rng(0).standard_normal((problem.num_params, 2))
    out = lin @ v
    assert out.dtype == np.float64 and out.shape == v.shape
    dense = reference_hessian(problem).numpy()
    np.testing.assert_allclose(out, dense @ v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lin.matvec(v[:, 0]), dense @ v[:, 0], rtol=1e-4, atol=1e-5)


def test_auto_method_resolves_through_the_per_device_table(make_problem) -> None:
    op = op_for(make_problem("logreg", "random"))
    assert op.method is AUTO_METHOD["cpu"] and op.method.value in METHODS


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_results_carry_no_autograd_graph(make_problem, bn_mode: str) -> None:
    # (batch-statistics BatchNorm's double backward used to leak a graph at level 0)
    problem = make_problem("bn_mlp", "random")
    v = random_block(problem.num_params, 2)
    for kwargs in (
        dict(method="double_backward"),
        dict(method="forward_over_reverse"),
        dict(curvature="ggn"),
    ):
        op = op_for(problem, bn_mode=bn_mode, **kwargs)
        assert not op.matmat(v).requires_grad
        assert not op.gradient().requires_grad


def test_inputs_on_another_layout_are_moved_and_cast_per_batch(
    make_problem, reference_hessian
) -> None:
    # float64 inputs for a float32 model are cast to the operator's dtype, batch by batch
    problem = make_problem("logreg", "random")
    op = CurvatureOperator(problem.model, problem.inputs.double(), problem.targets, batch_size=7)
    assert op.dtype == torch.float32
    v = random_block(op.num_params, 2).float()
    expected = reference_hessian(problem).float() @ v
    torch.testing.assert_close(op.matmat(v), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(curvature="fisher"), "curvature"),
        (dict(bn_mode="train"), "BatchNorm mode"),
        (dict(method="finite_differences"), "HVP method"),
        (dict(param_names=["nope.weight"]), "unknown parameter"),
        (dict(batch_size=0), "batch_size"),
        (dict(chunk_size=-1), "chunk_size"),
        (dict(dtype=torch.int64), "floating-point"),
    ],
)
def test_user_mistakes_raise_usage_errors(kwargs: dict, fragment: str, make_problem) -> None:
    problem = make_problem("logreg", "random")
    with pytest.raises(FlatcliError, match=fragment):
        op_for(problem, **kwargs)


def test_mismatched_data_and_bad_blocks_raise_usage_errors(make_problem) -> None:
    problem = make_problem("logreg", "random")
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))
    with pytest.raises(UsageError, match="targets"):
        CurvatureOperator(problem.model, x, y[:4])
    with pytest.raises(UsageError, match="integer class labels"):
        CurvatureOperator(problem.model, x, y.float())
    op = op_for(problem)
    with pytest.raises(UsageError, match="shape"):
        op.matmat(torch.zeros(op.num_params + 1, 2, dtype=F64))


def test_cached_gradient_graphs_give_the_same_products_over_several_batches(make_problem) -> None:
    problem = make_problem("mlp_relu", "digits")
    v = torch.randn(sum(p.numel() for p in problem.model.parameters()), 3, dtype=torch.float64)
    fresh = CurvatureOperator(
        problem.model,
        problem.inputs,
        problem.targets,
        batch_size=37,
        dtype=torch.float64,
        cache_graph=False,
        method="double_backward",
    )
    cached = CurvatureOperator(
        problem.model,
        problem.inputs,
        problem.targets,
        batch_size=37,
        dtype=torch.float64,
        cache_graph=True,
        method="double_backward",
    )
    expected = fresh.matmat(v)
    for _ in range(2):  # the second call runs on the cached graphs
        assert torch.allclose(cached.matmat(v), expected, rtol=1e-12, atol=1e-14)
