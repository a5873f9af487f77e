"""The Hessian engine: curvature operators and the estimators that use them.

* operator: :class:`CurvatureOperator` applies the Hessian (or GGN) of the mean
  cross-entropy to a block of vectors in one data pass.
* dense kernels (:mod:`flatcli.curvature.linalg`): Gram-Schmidt, tridiagonal
  eigen-decomposition, the density broadening rule, mean and standard error.
* spectrum ends: :func:`lanczos`, :func:`lambda_max`, :func:`lambda_min`,
  :func:`extreme_eigenvalues` (one Lanczos core, :class:`LockstepLanczos`).
* trace and norm: :func:`trace_and_frobenius` (both from the same products),
  :func:`hutchpp_trace`, :func:`hutchinson_trace`, :func:`frobenius`.
* density: :func:`slq_density`; of an exact spectrum: :func:`exact_density`.
* exact references: :func:`dense_hessian`, :func:`exact_spectrum`,
  :func:`dense_spectrum`, :func:`hessian_via_torch_func`,
  :func:`logistic_regression_hessian`, :func:`logistic_regression_trace`.
* results: :class:`Estimate` (a value and its uncertainty), :class:`LanczosResult`,
  :class:`SpectralDensity`.
"""

from flatcli.curvature.density import slq_density
from flatcli.curvature.exact import (
    dense_hessian,
    dense_spectrum,
    exact_spectrum,
    hessian_via_torch_func,
    logistic_regression_hessian,
    logistic_regression_trace,
)
from flatcli.curvature.lanczos import (
    LockstepLanczos,
    extreme_eigenvalues,
    lambda_max,
    lambda_min,
    lanczos,
)
from flatcli.curvature.linalg import exact_density
from flatcli.curvature.operator import (
    AUTO_METHOD,
    DEFAULT_BATCH,
    BatchNormMode,
    Curvature,
    CurvatureOperator,
    HvpMethod,
    activation_bytes_per_sample,
    auto_batch_size,
    memory_bounded,
    suggest_chunk_size,
)
from flatcli.curvature.results import Estimate, LanczosResult, SpectralDensity
from flatcli.curvature.trace import frobenius, hutchinson_trace, hutchpp_trace, trace_and_frobenius

__all__ = [
    "memory_bounded",
    "auto_batch_size",
    "DEFAULT_BATCH",
    "suggest_chunk_size",
    "activation_bytes_per_sample",
    # operator
    "CurvatureOperator",
    "Curvature",
    "BatchNormMode",
    "HvpMethod",
    "AUTO_METHOD",
    # extreme eigenvalues
    "lanczos",
    "lambda_max",
    "lambda_min",
    "extreme_eigenvalues",
    "LockstepLanczos",
    # trace and Frobenius norm
    "trace_and_frobenius",
    "hutchpp_trace",
    "hutchinson_trace",
    "frobenius",
    # spectral density
    "slq_density",
    "exact_density",
    # exact references and closed forms
    "dense_hessian",
    "dense_spectrum",
    "exact_spectrum",
    "hessian_via_torch_func",
    "logistic_regression_hessian",
    "logistic_regression_trace",
    # results
    "Estimate",
    "LanczosResult",
    "SpectralDensity",
]
