"""Tiny problems and dense float64 references shared by the curvature tests.

A *problem* is a model (logistic regression, MLPs with tanh and ReLU, a small CNN, nets
with BatchNorm1d / BatchNorm2d) on a data set (Gaussian random inputs with random
labels, or 200 real 8x8 digits from scikit-learn scaled to [0, 1]). Every estimator test
compares against ``reference_hessian``: ``torch.func.hessian`` of the flattened-parameter
loss of a float64 copy of the model (:func:`flatcli.curvature.hessian_via_torch_func`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from flatcli.curvature import hessian_via_torch_func


def pytest_configure(config: pytest.Config) -> None:
    # torch's first use of forward-mode AD scripts its decompositions (a torch warning).
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning"
    )


@dataclass(frozen=True)
class Problem:
    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor

    @property
    def has_batch_norm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@functools.cache
def digits(n: int = 200) -> tuple[Tensor, Tensor]:
    """The first n scikit-learn digits: (n, 64) float32 in [0, 1], labels 0-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target[:n], dtype=torch.long)


def random_data(n: int, d: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _build(kind: str, d: int, side: int, classes: int) -> nn.Module:
    """``d`` inputs for vector models; (1, side, side) images for CNNs."""
    if kind == "logreg":
        return nn.Linear(d, classes)
    if kind == "mlp_tanh":
        return nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, classes))
    if kind == "mlp_relu":
        return nn.Sequential(
            nn.Linear(d, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, classes)
        )
    flat = 2 * ((side - 2) // 2) ** 2
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(flat, classes)
        )
    if kind == "bn_mlp":
        return nn.Sequential(nn.Linear(d, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, classes))
    if kind == "bn_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, classes),
        )
    raise ValueError(kind)


MODELS = ("logreg", "mlp_tanh", "mlp_relu", "cnn", "bn_mlp", "bn_cnn")
DATASETS = ("random", "digits")


@functools.cache
def build_problem(kind: str, dataset: str) -> Problem:
    """Seeded model on a data set; BatchNorm models get non-trivial running statistics
    (a few train-mode forward passes) and are left in train mode, as after training.
    """
    if dataset == "random":
        side, classes = 6, 3
        x, y = random_data(37, side * side if kind.endswith("cnn") else 5, classes, seed=1)
    else:
        side, classes = 8, 10
        x, y = digits()
    if kind.endswith("cnn"):
        x = x.reshape(-1, 1, side, side)
    torch.manual_seed(0)
    model = _build(kind, x.shape[1] if x.dim() == 2 else 0, side, classes)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(x + 0.5)
    return Problem(f"{kind}-{dataset}", model, x, y)


ALL_PROBLEMS = [(m, d) for m in MODELS for d in DATASETS]


@functools.cache
def _reference(kind: str, dataset: str, bn_mode: str) -> Tensor:
    p = build_problem(kind, dataset)
    return hessian_via_torch_func(p.model, p.inputs, p.targets, bn_mode=bn_mode)


def dense_reference(problem: Problem, bn_mode: str = "eval") -> Tensor:
    """Dense float64 Hessian of the mean cross-entropy by torch.func.hessian (cached)."""
    kind, dataset = problem.name.split("-")
    return _reference(kind, dataset, bn_mode)


class DenseOperator:
    """A symmetric matrix with the operator interface the estimators use (for tests of
    the linear algebra on spectra chosen by hand).
    """

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.device = matrix.device
        self.dtype = matrix.dtype
        self.hvps = 0
        self.passes = 0

    def matmat(self, v: Tensor) -> Tensor:
        self.hvps += v.shape[1]
        self.passes += 1
        return self.matrix @ v

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v[:, None])[:, 0]


def matrix_with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """Q diag(eigenvalues) Q^T with a seeded random orthogonal Q (float64)."""
    gen = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * eigenvalues.to(torch.float64)) @ q.T


# Fixtures (test modules take the helpers from here rather than importing conftest,
# whose module name is not unique across the test tree).


@pytest.fixture(params=ALL_PROBLEMS, ids=lambda p: f"{p[0]}-{p[1]}")
def problem(request: pytest.FixtureRequest) -> Problem:
    """Every model on every data set."""
    return build_problem(*request.param)


@pytest.fixture(scope="session")
def make_problem():
    """``make_problem(kind, dataset) -> Problem`` (cached; kinds in MODELS, data sets
    "random" (N = 37, 3 classes) and "digits" (N = 200, 10 classes)).
    """
    return build_problem


@pytest.fixture(scope="session")
def reference_hessian():
    """``reference_hessian(problem, bn_mode="eval") -> (P, P) float64``."""
    return dense_reference


@pytest.fixture(scope="session")
def dense_operator():
    """The :class:`DenseOperator` class: wraps a symmetric matrix as an operator."""
    return DenseOperator


@pytest.fixture(scope="session")
def spectrum_matrix():
    """``spectrum_matrix(eigenvalues, seed=0)``: Q diag(eigenvalues) Q^T, float64."""
    return matrix_with_spectrum
