"""Dense Hessians for small problems: references for the estimators, and closed forms.

* :func:`dense_hessian` assembles H = [H e_1, ..., H e_P] from the operator, in blocks of
  columns (one data pass each), so it has exactly the operator's semantics
  (curvature, bn_mode, l2, param_names, dtype).
* :func:`hessian_via_torch_func` is an independent reference: ``torch.func.hessian`` of
  the flattened-parameter loss of a float64 copy of the model.
* :func:`logistic_regression_hessian` / :func:`logistic_regression_trace`: the closed
  forms for a linear softmax classifier (Granziol 2020, section on logistic regression),
  with no autograd at all.
* :func:`verified_logistic_regression_hessian`: that closed form for an operator's model,
  only when the model provably computes ``W x.flatten(1) + b`` (flatcli's ``logreg``), or
  when its logits and a few products were checked against the generic operator.

A dense P x P matrix needs 8 P^2 bytes in float64; each function refuses with
:class:`~flatcli.errors.TooLargeError` above ``max_bytes`` (default 2 GiB, P ~ 16,000).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian
from torch.nn.modules import module as module_lib

from flatcli.curvature.operator import Curvature, CurvatureOperator
from flatcli.curvature.probes import LinearOperatorLike
from flatcli.distributed import all_agree, all_reduce_sum
from flatcli.errors import TooLargeError, UnknownNameError, UsageError
from flatcli.models.linear import LogReg

DEFAULT_MAX_BYTES = 2 * 2**30


def _check_size(num_params: int, max_bytes: int) -> None:
    need = 8 * num_params**2
    if need > max_bytes:
        raise TooLargeError(
            f"a dense Hessian of {num_params:,} parameters needs {need / 2**30:.2f} GiB "
            f"(limit {max_bytes / 2**30:.2f} GiB)",
            "use the Lanczos / Hutch++ / SLQ estimators, restrict to a layer with "
            "param_names, or raise max_bytes",
        )


def dense_hessian(
    op: LinearOperatorLike, *, max_bytes: int = DEFAULT_MAX_BYTES, block_size: int = 128
) -> Tensor:
    """The operator as a dense (P, P) matrix on its device and dtype, ``op.matmat`` of
    the identity in blocks of ``block_size`` columns (P / block_size data passes).
    """
    n = op.num_params
    _check_size(n, max_bytes)
    if block_size < 1:
        raise UsageError(f"block_size must be positive, got {block_size}")
    columns = []
    for start in range(0, n, block_size):
        width = min(block_size, n - start)
        unit = torch.zeros(n, width, device=op.device, dtype=op.dtype)
        unit[start : start + width].fill_diagonal_(1.0)
        columns.append(op.matmat(unit))
    return torch.cat(columns, dim=1)


def dense_spectrum(matrix: Tensor) -> Tensor:
    """All eigenvalues of a dense curvature matrix: ``eigvalsh((H + H^T) / 2)`` in float64
    on the CPU, ascending.

    A Hessian assembled column by column (or a closed form) is symmetric only up to the
    rounding of its products; ``eigvalsh`` reads one triangle, so the symmetrisation makes
    the spectrum that of the nearest symmetric matrix rather than of one triangle.
    """
    h = matrix.detach().to("cpu", torch.float64)
    eigenvalues: Tensor = torch.linalg.eigvalsh((h + h.T) / 2)
    return eigenvalues


def exact_spectrum(
    op: LinearOperatorLike, *, max_bytes: int = DEFAULT_MAX_BYTES, block_size: int = 128
) -> Tensor:
    """All eigenvalues of the operator, float64 on the CPU, ascending: the
    :func:`dense_spectrum` of :func:`dense_hessian`. The one exact spectrum of flatcli.
    """
    return dense_spectrum(dense_hessian(op, max_bytes=max_bytes, block_size=block_size))


class _DecomposedBatchNorm(nn.Module):
    """BatchNorm with batch statistics written out in elementary ops.

    Used by the reference only: in torch 2.14, ``torch.func.hessian`` through the fused
    ``F.batch_norm(training=True)`` gives wrong (non-symmetric) second derivatives for
    the BatchNorm weight, while plain autograd and finite differences agree with this
    decomposition.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
        out = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.reshape(shape)
        if self.bias is not None:
            out = out + self.bias.reshape(shape)
        return out


def _decompose_batch_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, _DecomposedBatchNorm(child))
        else:
            _decompose_batch_norms(child)


def hessian_via_torch_func(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    bn_mode: str = "eval",
    param_names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Tensor:
    """Reference Hessian of the mean cross-entropy by ``torch.func.hessian``.

    Works on a ``dtype`` copy of the model in eval mode; ``bn_mode="batch"`` replaces
    each BatchNorm by a decomposed batch-statistics version (see
    :class:`_DecomposedBatchNorm`). The whole data set is one batch (so ``"full"``, the
    statistics of the whole set, is the same matrix as ``"batch"`` here). Parameters are
    flattened in ``named_parameters()`` order (restricted to ``param_names``), the same
    order as :class:`~flatcli.curvature.operator.CurvatureOperator`.
    """
    if bn_mode not in ("eval", "batch", "full"):
        raise UnknownNameError(
            f"unknown BatchNorm mode {bn_mode!r}", "choose 'eval', 'batch' or 'full'"
        )
    net = copy.deepcopy(model).to(dtype).eval()
    if bn_mode in ("batch", "full"):  # one batch of all the data: the two coincide
        _decompose_batch_norms(net)
    named = dict(net.named_parameters())
    names = list(named) if param_names is None else list(param_names)
    _check_size(sum(named[n].numel() for n in names), max_bytes)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    x = inputs.to(dtype) if inputs.is_floating_point() else inputs

    def loss(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return F.cross_entropy(functional_call(net, params, (x,)), targets)

    matrix: Tensor = hessian(loss)(theta)
    return matrix


def _augmented(inputs: Tensor, bias: Tensor | None) -> Tensor:
    """x~ = [x, 1] when there is a bias, else x; (N, d) or (N, d + 1)."""
    x = inputs.reshape(inputs.shape[0], -1)
    if bias is None:
        return x
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


@torch.no_grad()
def logistic_regression_hessian(
    weight: Tensor,
    bias: Tensor | None,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk: int = 64,
) -> Tensor:
    """Closed-form Hessian of the mean cross-entropy of a linear softmax classifier.

    With p_i = softmax(W x_i + b), A_i = diag(p_i) - p_i p_i^T and x~_i = [x_i, 1]:

        H = (1/N) sum_i A_i kron x~_i x~_i^T          (C(d+1) x C(d+1)),

    in the ordering of the flat vector vec([W | b]) row-major, i.e. index c (d+1) + j
    for entry (c, j) of the augmented weight matrix: block (c, c') of size (d+1)^2 is
    (1/N) sum_i A_i[c, c'] x~_i x~_i^T. The returned matrix is that one permuted to the
    operator's ordering: W (C, d) row-major (index c d + j) followed by b (C,) (index
    C d + c). The labels do not enter (``targets`` is accepted for symmetry and unused).
    No autograd is involved. ``bias=None`` drops the appended 1 and the bias block.
    """
    del targets  # the Hessian of softmax cross-entropy does not depend on the labels
    num_classes, d = weight.shape
    x = _augmented(inputs, bias).to(weight.dtype)
    d_aug = x.shape[1]
    _check_size(num_classes * d_aug, max_bytes)
    blocks = torch.zeros(
        num_classes, num_classes, d_aug, d_aug, dtype=weight.dtype, device=weight.device
    )
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        logits = xb[:, :d] @ weight.T + (bias if bias is not None else 0)
        p = torch.softmax(logits, dim=1)
        a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C)
        # sum_i A_i[c, c'] x~_i x~_i^T for all (c, c') in one matmul
        weighted = (a[:, :, :, None] * xb[:, None, None, :]).reshape(xb.shape[0], -1)
        blocks += (weighted.T @ xb).reshape(num_classes, num_classes, d_aug, d_aug)
    blocks /= x.shape[0]
    # (c, c', j, j') -> kron ordering (c, j, c', j'), then move the bias columns last
    kron = blocks.permute(0, 2, 1, 3).reshape(num_classes * d_aug, num_classes * d_aug)
    if bias is None:
        return kron
    index = torch.arange(num_classes * d_aug).reshape(num_classes, d_aug)
    order = torch.cat([index[:, :d].reshape(-1), index[:, d]]).to(weight.device)
    return kron[order][:, order]


@torch.no_grad()
def logistic_regression_trace(
    weight: Tensor, bias: Tensor | None, inputs: Tensor, targets: Tensor | None = None
) -> float:
    """Closed-form trace: ``Tr H = (1/N) sum_i ||x~_i||^2 (1 - ||p_i||^2)``.

    (Tr(A kron B) = Tr A Tr B, and Tr(diag p - p p^T) = 1 - ||p||^2.) No autograd.
    """
    del targets
    x = _augmented(inputs, bias).to(weight.dtype)
    logits = x[:, : weight.shape[1]] @ weight.T + (bias if bias is not None else 0)
    p = torch.softmax(logits, dim=1)
    return float((x.pow(2).sum(dim=1) * (1 - p.pow(2).sum(dim=1))).mean())


def unhooked(model: nn.Module) -> bool:
    """No forward hooks (global or per module) and no instance-level ``forward``: each
    module computes what its class's ``forward`` says.
    """
    if module_lib._global_forward_hooks or module_lib._global_forward_pre_hooks:
        return False
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m)
        for m in model.modules()
    )


def single_linear(model: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` whose weight (and bias, if any) are all of ``model``'s
    parameters, in ``named_parameters()`` order and all trainable; else ``None``.

    This says only where the parameters live, not what the model computes with them.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        return None
    lin = linears[0]
    own = [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    params = list(model.parameters())
    if len(params) != len(own) or any(p is not q for p, q in zip(params, own, strict=True)):
        return None
    return lin if all(p.requires_grad for p in params) else None


def is_flatcli_logreg(model: nn.Module) -> bool:
    """Flatcli's own ``logreg`` (:class:`flatcli.models.linear.LogReg`, not a subclass)
    with a plain ``nn.Linear`` and no hooks: ``fc(x.flatten(1))`` by construction.
    """
    return type(model) is LogReg and type(model.fc) is nn.Linear and unhooked(model)


#: Relative tolerance of the float64 product check of
#: :func:`verified_logistic_regression_hessian` (rounding there is ~1e-13 and below).
PRODUCT_RTOL = 1e-9


@torch.no_grad()
def verified_logistic_regression_hessian(
    op: CurvatureOperator,
    model: nn.Module,
    *,
    probes: int = 2,
    seed: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Tensor | None:
    """The closed-form Hessian (float64, plus ``op.l2 * I``) of ``op``'s loss when the
    model is provably logistic regression, else ``None`` (use the generic path).

    The closed form is the Hessian of the cross-entropy of z = W x.flatten(1) + b; it is
    the operator's matrix only when the model computes exactly that function of (W, b).
    A one-layer model may not (logits / temperature, a weight used twice, an extra
    scale): its Hessian then differs, possibly by a large factor. Accepted:

    * flatcli's ``logreg`` (:func:`is_flatcli_logreg`), which is that function by
      construction;
    * a model whose parameters are one ``nn.Linear``'s (:func:`single_linear`) and which
      passes two checks, in float64 through a float64 copy of the operator
      (:meth:`CurvatureOperator.astype`), so that rounding cannot hide a difference:
      (1) its logits on every sample equal x W^T + b to within the dot products' rounding
      bound, ``|z - x W^T - b| <= 4 (d + 2) eps |x| |W|^T + |b|`` entrywise (Higham 2002,
      "Accuracy and Stability of Numerical Algorithms", eq. 3.5); (2) its products with
      ``probes`` Gaussian vectors V equal the closed form's,
      ``||H_op V - H V||_F <= PRODUCT_RTOL ||H||_F ||V||_F`` (H with its ``l2 I``). Equal logits alone
      are not enough (at W = 0, b = 0 the logits z / 2 and z agree, their Hessians do
      not); the products catch what the logits miss.

    ``None`` also when the operator streams its data (a DataLoader): the closed form
    needs all inputs in memory, and the generic dense path gives the same matrix.
    """
    lin = single_linear(model)
    if lin is None or op.curvature is not Curvature.HESSIAN:
        return None
    names = [n for n, _ in model.named_parameters()]
    x_all = op._inputs
    if x_all is None:  # a streamed source (DataLoader): the generic dense path, same matrix
        return None
    if tuple(names) != op.param_names or x_all[0].numel() != lin.in_features:
        return None
    dtype, device = torch.float64, lin.weight.device
    weight = lin.weight.detach().to(dtype)
    bias = None if lin.bias is None else lin.bias.detach().to(dtype)
    h = logistic_regression_hessian(weight, bias, x_all.flatten(1).to(device), max_bytes=max_bytes)
    if op.num_samples != len(
        x_all
    ):  # torchrun: the mean over this shard, weighted and summed over shards
        h.mul_(len(x_all) / op.num_samples)
        all_reduce_sum([h])
    h = h + op.l2 * torch.eye(h.shape[0], dtype=dtype, device=device)
    if is_flatcli_logreg(model):
        return h
    op64 = op.astype(dtype)
    eps = torch.finfo(dtype).eps
    d = lin.in_features
    same = True
    for start in range(0, len(x_all), op64.batch_size):
        x = x_all[start : start + op64.batch_size].to(device=device, dtype=dtype)
        z = op64._logits(op64.params, x)
        xf = x.flatten(1)
        linear = xf @ weight.T + (bias if bias is not None else 0)
        scale = xf.abs() @ weight.abs().T + (bias.abs() if bias is not None else 0)
        if z.shape != linear.shape or bool(((z - linear).abs() > 4 * (d + 2) * eps * scale).any()):
            same = False
            break
    if not all_agree(same):  # every process of a torchrun takes the same path
        return None
    gen = torch.Generator().manual_seed(
        seed
    )  # on the CPU: the same vectors on every process and device
    v = torch.randn(h.shape[0], probes, generator=gen, dtype=dtype).to(device)
    gap = torch.linalg.matrix_norm(op64.matmat(v) - h @ v)
    if gap > PRODUCT_RTOL * torch.linalg.matrix_norm(h) * torch.linalg.matrix_norm(v):
        return None
    return h
