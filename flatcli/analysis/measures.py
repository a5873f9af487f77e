"""The sharpness report: which estimator answers which measure, at one point in weight space.

Measures of the curvature of the mean cross-entropy L(w) over a data set (the Hessian H,
or the generalised Gauss-Newton matrix G; without the regulariser unless asked, as
Granziol 2020 measures it):

=============  ==========================================  ===============================
measure        definition                                  estimator (uncertainty)
=============  ==========================================  ===============================
lambda_max     largest eigenvalue of H                     Lanczos, full reorthogonalisation
                                                           (Ritz residual bound)
lambda_min     smallest eigenvalue of H                    same run when both are asked for
spectral_norm  max(|lambda_max|, |lambda_min|)             from the two (larger bound)
trace          Tr H = sum of eigenvalues                   block Krylov Hutch++ (std. error)
frobenius      ||H||_F = sqrt(Tr H^2)                      same products as trace (std. error)
density        spectral density of H                       stochastic Lanczos quadrature
=============  ==========================================  ===============================

Measures that see through the scale of the weights (beyond the paper; see ``scale``):

=======================  ================================================  ================
lambda_max_normalised    lambda_max ||w||^2                                 as lambda_max
trace_normalised         Tr(H) ||w||^2                                      as trace
adaptive_sharpness       E_{d ~ |w| * N(0, rho^2)} [L(w + d) - L(w)]        Monte Carlo (s.e.)
                         (Kwon et al. 2021; Andriushchenko et al. 2023)
relative_flatness        sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}) of the last    exact closed form
                         layer (Petzka et al. 2021)
=======================  ================================================  ================

With ``exact=True`` the dense matrix is built (refused when it would not fit) and every
measure comes from its eigenvalues, with zero uncertainty; for logistic regression the
closed form H = (1/N) sum_i (diag p_i - p_i p_i^T) kron x_i x_i^T needs no autograd. It is
used only for a model that provably computes W x.flatten(1) + b (flatcli's ``logreg``, or
logits and products checked against the generic operator): a one-layer model that scales
its logits has a different Hessian.

Measures are a registry (:data:`MEASURES`) of functions of a :class:`MeasureContext`,
which shares work between them (one Lanczos run for both extremes, one dense spectrum).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from flatcli.config import SharpnessConfig  # noqa: F401  (defined in config.py, which needs no torch; re-exported)
from flatcli.curvature import (
    CurvatureOperator,
    EigenEstimate,
    FrobeniusEstimate,
    StochasticEstimate,
    dense_hessian,
    extreme_eigenvalues,
    lambda_max,
    lambda_min,
    memory_bounded,
    slq_density,
    trace_and_frobenius,
)
from flatcli.curvature.batches import as_source
from flatcli.curvature.exact import single_linear, verified_logistic_regression_hessian
from flatcli.curvature.results import Estimate
from flatcli.distributed import my_shard
from flatcli.errors import NonFiniteError, UsageError, few

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Density:
    grid: list[float]
    values: list[float]
    hvps: int = 0

    def as_dict(self) -> dict:
        return {"grid": self.grid, "values": self.values}


@dataclass(frozen=True)
class LayerReport:
    name: str
    params: tuple[str, ...]
    num_params: int
    measures: dict[str, Any]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "params": list(self.params),
            "num_params": self.num_params,
            **{k: v.as_dict() for k, v in self.measures.items()},
        }


@dataclass(frozen=True)
class SharpnessReport:
    """Everything ``flatcli sharpness`` measured at one point."""

    checkpoint: str | None
    dataset: str | None
    split: str
    num_samples: int
    num_params: int
    curvature: str
    bn_mode: str
    dtype: str
    device: str
    seed: int
    loss: float
    accuracy: float
    weight_norm: float
    l2: float
    measures: dict[str, Any]
    hvps: int
    seconds: float
    exact: bool = False
    layers: list[LayerReport] = field(default_factory=list)
    #: The measures served from ``sharpness.json`` (not computed by this call); see ``flatcli.sharpness``.
    cached: tuple[str, ...] = ()
    #: The batch whose statistics define the matrix (SharpnessConfig.bn_batch_size; with
    #: bn_mode "full" all num_samples); None with running statistics (bn_mode "eval").
    bn_batch_size: int | None = None

    @property
    def fully_cached(self) -> bool:
        """Every measure came from the cache (this call did no Hessian-vector product)."""
        return bool(self.cached) and set(self.measures) <= set(self.cached)

    def to_dict(self) -> dict:
        """The report as the JSON document of ``flatcli sharpness --json`` (key order included)."""
        return self.as_dict()

    def as_dict(self) -> dict:
        head = {
            k: getattr(self, k)
            for k in (
                "checkpoint",
                "dataset",
                "split",
                "num_samples",
                "num_params",
                "curvature",
                "bn_mode",
                "dtype",
                "device",
                "seed",
                "loss",
                "accuracy",
                "weight_norm",
            )
        }
        head["include_l2"] = self.l2
        head["exact"] = self.exact
        head["bn_batch_size"] = self.bn_batch_size
        body = {k: v.as_dict() for k, v in self.measures.items()}
        tail: dict[str, Any] = {
            "hvps": self.hvps,
            "seconds": self.seconds,
            "cached": self.fully_cached,
        }
        if (
            self.cached and not self.fully_cached
        ):  # some measures from the cache, the rest computed now
            tail["cached_measures"] = list(self.cached)
        if self.layers:
            tail = {"layers": [layer.as_dict() for layer in self.layers], **tail}
        return {**head, **body, **tail}

    @classmethod
    def from_dict(cls, d: dict) -> SharpnessReport:
        """Rebuild a report from :meth:`as_dict` (used by the ``sharpness.json`` cache)."""
        measures = {}
        for name, value in d.items():  # in the document's order (the order they were asked for)
            if name in MEASURES or name == "spectral_norm":
                measures[name] = _measure_from_dict(value)
        layers = [
            LayerReport(
                x["name"],
                tuple(x["params"]),
                x["num_params"],
                {k: _measure_from_dict(v) for k, v in x.items() if isinstance(v, dict)},
            )
            for x in d.get("layers", [])
        ]
        return cls(
            d["checkpoint"],
            d["dataset"],
            d["split"],
            d["num_samples"],
            d["num_params"],
            d["curvature"],
            d["bn_mode"],
            d["dtype"],
            d["device"],
            d["seed"],
            d["loss"],
            d["accuracy"],
            d["weight_norm"],
            d.get("include_l2", 0.0),
            measures,
            d["hvps"],
            d["seconds"],
            d.get("exact", False),
            layers,
            tuple(measures) if d.get("cached") is True else tuple(d.get("cached_measures", ())),
            bn_batch_size=d.get("bn_batch_size"),
        )


def _measure_from_dict(d: dict):
    if "grid" in d:
        return Density(d["grid"], d["values"])
    # An entry written before the flag existed cannot say: only an exact value is trusted.
    converged = d.get("converged", "bound" in d and d["bound"] == 0) is True
    if "stderr" in d:
        return Estimate(d["value"], d["stderr"], "stderr", converged=converged)
    return Estimate(d["value"], d["bound"], "bound" if d["bound"] else "exact", converged=converged)


class MeasureContext:
    """Shared state of one measurement: the operator and work reused across measures."""

    def __init__(
        self,
        op: CurvatureOperator,
        config: SharpnessConfig,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        closed_form: bool,
        status: Callable[[str], None] | None = None,
    ) -> None:
        self.op, self.config, self.model = op, config, model
        self.status = status
        self.inputs, self.targets = inputs, targets
        self.closed_form = closed_form
        self._extremes: tuple[EigenEstimate, EigenEstimate] | None = None
        self._trace_norm: tuple[StochasticEstimate, FrobeniusEstimate] | None = None
        self._claimed: set[str] = set()
        self._spectrum: torch.Tensor | None = None
        self._results: dict[str, Any] = {}
        self.weight_norm = math.sqrt(
            sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
        )

    def get(self, name: str) -> Any:
        """The result of measure ``name``, computed once per context."""
        if name not in self._results:
            self._results[name] = MEASURES[name](self)
            result = self._results[name]
            if isinstance(result, Estimate):
                self.say(f"{name} {result.value:.6g} ± {result.uncertainty:.2g}")
        return self._results[name]

    def say(self, text: str) -> None:
        """Pass the current estimate to the ``status`` callback (a progress display)."""
        if self.status is not None:
            self.status(text)

    def lanczos_callback(
        self, label: str
    ) -> Callable[[int, tuple[float, ...], tuple[float, ...]], None] | None:
        """A Lanczos callback that reports ``label``'s running Ritz values and bounds."""
        if self.status is None:
            return None

        def report(step: int, values: tuple[float, ...], bounds: tuple[float, ...]) -> None:
            text = ", ".join(f"{v:.6g} ± {b:.2g}" for v, b in zip(values, bounds))
            self.say(f"{label} (Lanczos step {step}): {text}")

        return report

    # -- shared work ---------------------------------------------------------------
    def spectrum(self) -> torch.Tensor:
        """Exact eigenvalues (float64, ascending) of the dense matrix."""
        if self._spectrum is None:
            # the closed form only for a model verified to be W x.flatten(1) + b
            h = (
                verified_logistic_regression_hessian(self.op, self.model)
                if self.closed_form
                else None
            )
            if h is None:
                h = dense_hessian(self.op).double()
            self._spectrum = torch.linalg.eigvalsh(h.cpu())
        return self._spectrum

    def claim(self, work: str, hvps: int) -> int:
        """``hvps`` the first time shared ``work`` is reported, 0 after (counted once)."""
        if work in self._claimed:
            return 0
        self._claimed.add(work)
        return hvps

    def trace_and_norm(self) -> tuple[StochasticEstimate, FrobeniusEstimate]:
        """Tr H and ||H||_F from ONE block Krylov Hutch++ run (the same products)."""
        if self._trace_norm is None:
            c = self.config
            targets = tuple(m for m in ("trace", "frobenius") if m in c.measures) or (
                "trace",
                "frobenius",
            )
            self._trace_norm = trace_and_frobenius(
                self.op,
                probes=c.probes,
                seed=c.seed,
                target_rel_stderr=c.target_stderr,
                targets=targets,
            )
        return self._trace_norm

    def extremes(self) -> tuple[EigenEstimate, EigenEstimate]:
        if self._extremes is None:
            c = self.config
            self._extremes = extreme_eigenvalues(
                self.op,
                tol=c.tol,
                max_iter=c.max_iter,
                seed=c.seed,
                callback=self.lanczos_callback("lambda_min, lambda_max"),
            )
        return self._extremes


def _spectrum_end(ctx: MeasureContext, name: str) -> Estimate:
    """``lambda_max`` or ``lambda_min``: exact, from the shared run for both ends when
    both are asked for (its HVPs counted under lambda_max), or from a run of its own.
    """
    high = name == "lambda_max"
    if ctx.config.exact:
        return Estimate(float(ctx.spectrum()[-1 if high else 0]), 0.0, "exact")
    if ("lambda_min" if high else "lambda_max") in ctx.config.measures:
        est = ctx.extremes()[1 if high else 0]
        return Estimate(est.value, est.bound, "bound", est.hvps if high else 0, est.converged)
    c = ctx.config
    est = (lambda_max if high else lambda_min)(
        ctx.op, tol=c.tol, max_iter=c.max_iter, seed=c.seed, callback=ctx.lanczos_callback(name)
    )
    return Estimate(est.value, est.bound, "bound", est.hvps, est.converged)


def _lambda_max(ctx: MeasureContext) -> Estimate:
    return _spectrum_end(ctx, "lambda_max")


def _lambda_min(ctx: MeasureContext) -> Estimate:
    return _spectrum_end(ctx, "lambda_min")


def _trace(ctx: MeasureContext) -> Estimate:
    if ctx.config.exact:
        return Estimate(float(ctx.spectrum().sum()), 0.0, "exact")
    est = ctx.trace_and_norm()[0]  # converged: >= MIN_SAMPLES remainder samples (see Estimate)
    return Estimate(
        est.value, est.stderr, "stderr", ctx.claim("trace_and_norm", est.hvps), est.converged
    )


def _frobenius(ctx: MeasureContext) -> Estimate:
    if ctx.config.exact:
        return Estimate(float(ctx.spectrum().pow(2).sum().sqrt()), 0.0, "exact")
    est = ctx.trace_and_norm()[1]
    return Estimate(
        est.value, est.stderr, "stderr", ctx.claim("trace_and_norm", est.hvps), est.converged
    )


def _density(ctx: MeasureContext) -> Density:
    c = ctx.config
    if c.exact:
        eig = ctx.spectrum()
        d = density_from_eigenvalues(eig)
        return Density(d[0].tolist(), d[1].tolist())
    est = slq_density(
        ctx.op, probes=c.density_probes, iterations=c.density_iterations, seed=c.seed + 2
    )
    return Density(est.grid.tolist(), est.values.tolist(), est.hvps)


def _normalised(base: str) -> Callable[[MeasureContext], Estimate]:
    def compute(ctx: MeasureContext) -> Estimate:
        est = ctx.get(base)
        w2 = ctx.weight_norm**2
        hvps = 0 if base in ctx.config.measures else est.hvps  # counted once
        return Estimate(est.value * w2, est.uncertainty * w2, est.kind, hvps, est.converged)

    compute.__doc__ = (
        f"{base} times ||w||^2 (invariant to a global rescaling of a homogeneous model)."
    )
    return compute


def _adaptive_sharpness(ctx: MeasureContext) -> Estimate:
    from flatcli.analysis.scale import adaptive_sharpness

    c = ctx.config
    est = adaptive_sharpness(
        ctx.model,
        ctx.inputs,
        ctx.targets,
        rho=c.rho,
        samples=c.sharpness_samples,
        seed=c.seed,
        logit_normalise=c.logit_normalise,
        batch_size=ctx.op.batch_size,
    )
    from flatcli.curvature.trace import MIN_SAMPLES

    return Estimate(
        est.value,
        est.stderr,
        "stderr",
        converged=c.sharpness_samples >= MIN_SAMPLES and math.isfinite(est.stderr),
    )


def _relative_flatness(ctx: MeasureContext) -> Estimate:
    from flatcli.analysis.scale import relative_flatness

    return Estimate(
        relative_flatness(ctx.model, ctx.inputs, ctx.targets, batch_size=ctx.op.batch_size),
        0.0,
        "exact",
    )


def density_from_eigenvalues(eig: torch.Tensor, grid_size: int = 512, sigma: float | None = None):
    """Gaussian-broadened density of given eigenvalues (the exact counterpart of SLQ)."""
    eig = eig.double().cpu()
    lo, hi = float(eig.min()), float(eig.max())
    width = max(hi - lo, 1e-12)
    sigma = sigma or width / 200
    grid = torch.linspace(
        lo - 4 * sigma - 0.01 * width, hi + 4 * sigma + 0.01 * width, grid_size, dtype=torch.float64
    )
    values = torch.exp(-0.5 * ((grid[:, None] - eig[None, :]) / sigma) ** 2).sum(1)
    values = values / (len(eig) * sigma * math.sqrt(2 * math.pi))
    return grid, values


#: name -> function of the context. Order is the order of the report.
MEASURES: dict[str, Callable[[MeasureContext], Any]] = {
    "lambda_max": _lambda_max,
    "lambda_min": _lambda_min,
    "trace": _trace,
    "frobenius": _frobenius,
    "density": _density,
    "lambda_max_normalised": _normalised("lambda_max"),
    "trace_normalised": _normalised("trace"),
    "adaptive_sharpness": _adaptive_sharpness,
    "relative_flatness": _relative_flatness,
}


#: Measures that make sense for one layer's diagonal block.
PER_LAYER = ("lambda_max", "lambda_min", "trace", "frobenius")


def _is_plain_logreg(model: nn.Module) -> bool:
    """A candidate for the closed form: every parameter belongs to one ``nn.Linear``. What
    the model computes with them is checked later (verified_logistic_regression_hessian).
    """
    return single_linear(model) is not None


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers holding a NaN or an Inf."""
    return [
        name
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())
    ]


def require_finite_weights(model: nn.Module, where: str = "the model") -> None:
    """Raise :class:`~flatcli.errors.NonFiniteError` naming the tensors with NaN/Inf values."""
    bad = non_finite_tensors(model)
    if bad:
        names = few(bad)
        raise NonFiniteError(
            f"{where} has non-finite weights (NaN or Inf) in {names}: its curvature is undefined"
        )


def measure(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | SharpnessConfig | None = None,
    config: SharpnessConfig | None = None,
    *,
    l2: float = 0.0,
    progress: Callable[[int], None] | None = None,
    status: Callable[[str], None] | None = None,
    checkpoint: str | None = None,
    dataset: str | None = None,
) -> SharpnessReport:
    """Measure ``config.measures`` of ``model`` on (inputs, targets); see the module doc.

    The data is ``inputs, targets`` (tensors), or ``inputs`` alone: a pair of tensors, a
    ``DataLoader`` or a re-iterable of ``(x, y)`` batches, streamed in its own batches
    and refused if it shuffles or augments at random (:mod:`flatcli.curvature.batches`);
    ``measure(model, data, config)`` is that form. With a stream, ``config.batch_size``
    does not apply (the loader's batches are used; with ``bn_mode="batch"`` they define
    the matrix and their size is reported as ``bn_batch_size``) and ``"full"`` gathers
    the batches into one in memory. The closed form of ``exact`` logistic regression
    needs the inputs in memory: with a stream the dense matrix comes from the operator.

    ``l2`` is the coupled-L2 coefficient added as ``l2 * I`` when ``config.include_l2``.
    ``progress`` gets the HVPs done after each data pass, ``status`` the current
    estimate as text (each Lanczos step, each finished measure).
    The model's device decides where the work runs; ``config.dtype`` its precision.

    Under torchrun every process passes the same data and measures its contiguous shard
    of it (:meth:`flatcli.distributed.World.data_shard`; whole batches with
    ``bn_mode="batch"``, all of it with ``"full"``): the operator's data passes add the
    shard sums over the processes, so each gets the one-process numbers up to rounding.
    Measures that read the data themselves (adaptive sharpness, relative flatness) take
    all of it on every process. A stream of batches (DataLoader) is taken as this
    process's part as it is: give each process its own part, or the same stream to all
    (each then weights by the global count, which is still the one-process mean).
    """
    start = time.perf_counter()
    if isinstance(targets, SharpnessConfig):  # measure(model, data, config)
        config, targets = targets, None
    config = config or SharpnessConfig()
    require_finite_weights(
        model
    )  # NaN/Inf weights: one clear error, not a LinAlgError from the eigensolver
    source = as_source(inputs, targets)  # a stream is read twice here and refused if it changes
    if source.streamed and config.bn_mode == "full":
        source = source.gather()  # whole-set statistics: one batch of all N samples, in memory
    if source.streamed and config.batch_size is not None:
        raise UsageError(
            f"batch size {config.batch_size} does not apply to a DataLoader: its own batches "
            "are measured",
            hint="set the loader's batch_size instead",
        )
    inputs, targets = (source, None) if source.streamed else (source.inputs, source.targets)
    dtype = DTYPES[config.dtype]
    device = next(model.parameters()).device
    coeff = l2 if config.include_l2 else 0.0
    widen = max(
        1, dtype.itemsize // next(model.parameters()).element_size()
    )  # float64 on a float32 model
    # with batch statistics the batch defines the matrix: never set by device or memory
    batch = config.bn_batch_size if config.bn_mode == "batch" else config.batch_size
    x_part, y_part = inputs, targets  # this process's samples (all of them with one process)
    if (
        isinstance(inputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and config.bn_mode != "full"
    ):
        part = my_shard(len(targets), batch if config.bn_mode == "batch" else None)
        x_part, y_part = inputs[part], targets[part]
    bounded = memory_bounded(
        model,
        x_part,
        batch,
        budget_bytes=int(config.memory_gb * 2**30 / widen),
        bn_mode=config.bn_mode,
    )
    op_kwargs = dict(
        curvature=config.curvature,
        bn_mode=config.bn_mode,
        l2=coeff,
        dtype=dtype,
        progress=progress,
        **bounded,
    )
    op = CurvatureOperator(model, x_part, y_part, **op_kwargs)
    closed_form = config.exact and config.curvature == "hessian" and _is_plain_logreg(model)
    ctx = MeasureContext(op, config, model, inputs, targets, closed_form, status)
    loss, accuracy = op.loss_and_accuracy()
    if not math.isfinite(loss):  # e.g. logits that overflow float32: every HVP would be NaN
        raise NonFiniteError(
            f"the loss is {loss} at these weights (logits overflow {config.dtype}?): "
            "its curvature is undefined"
        )
    try:
        results = {name: ctx.get(name) for name in config.measures}
    except (
        torch.linalg.LinAlgError
    ) as exc:  # a non-finite Hessian-vector product reached an eigensolver
        raise NonFiniteError(
            f"the curvature is not finite at these weights ({str(exc).splitlines()[0]})"
        ) from None
    if "lambda_max" in results and "lambda_min" in results:
        hi, lo = results["lambda_max"], results["lambda_min"]
        results["spectral_norm"] = max((hi, lo), key=lambda e: abs(e.value))
        results["spectral_norm"] = replace(
            results["spectral_norm"],
            value=abs(results["spectral_norm"].value),
            uncertainty=max(hi.uncertainty, lo.uncertainty),
            hvps=0,
        )
    layers: list[LayerReport] = []
    hvps = op.hvps
    if config.per_layer:
        for name, names in parameter_groups(model).items():
            sub = CurvatureOperator(model, x_part, y_part, param_names=names, **op_kwargs)
            sub_ctx = MeasureContext(sub, config, model, inputs, targets, closed_form=False)
            layers.append(
                LayerReport(
                    name,
                    tuple(names),
                    sub.num_params,
                    {m: sub_ctx.get(m) for m in config.measures if m in PER_LAYER},
                )
            )
            hvps += sub.hvps
    # samples measured: op.num_samples counts each process's part, which is all of the tensors on
    # every process when they are not sharded (bn_mode "full", fewer samples than processes)
    n_measured = len(targets) if isinstance(targets, torch.Tensor) else op.num_samples
    bn_batch = (
        n_measured
        if config.bn_mode == "full"
        else op.batch_size
        if source.streamed and config.bn_mode == "batch"
        else config.bn_batch_size
    )
    return SharpnessReport(
        checkpoint,
        dataset,
        config.split,
        n_measured,
        op.num_params,
        config.curvature,
        config.bn_mode,
        config.dtype,
        str(device),
        config.seed,
        loss,
        accuracy,
        ctx.weight_norm,
        coeff,
        results,
        hvps,
        time.perf_counter() - start,
        config.exact,
        layers,
        bn_batch_size=bn_batch,
    )


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameters grouped by the module that owns them (a layer's weight and bias)."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = name.rsplit(".", 1)[0] if "." in name else name
            groups.setdefault(owner, []).append(name)
    return groups
