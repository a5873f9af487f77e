"""The sharpness report: which estimator answers which measure, at one point in weight space.

Measures of the curvature of the mean cross-entropy L(w) over a data set (the Hessian H,
or the generalised Gauss-Newton matrix G; without the regulariser unless asked, as
Granziol 2020 measures it):

=============  ==========================================  ===============================
measure        definition                                  estimator (uncertainty)
=============  ==========================================  ===============================
lambda_max     largest eigenvalue of H                     Lanczos, full reorthogonalisation
                                                           (error bound)
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
its logits has a different Hessian. The exact density is broadened by the same rule as
the SLQ one (:func:`flatcli.curvature.linalg.exact_density`).

Measures are a registry (:data:`MEASURES`) of functions of a :class:`MeasureContext`,
which shares work between them (one Lanczos run for both extremes, one set of Hutch++
products for trace and Frobenius norm, one dense spectrum) and counts it once
(:meth:`MeasureContext.results`). Each returns an
:class:`~flatcli.curvature.results.Estimate` (the density a
:class:`~flatcli.analysis.sharpness_report.Density`); :func:`measure` gathers them into a
:class:`~flatcli.analysis.sharpness_report.SharpnessReport`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import torch
from torch import nn

from flatcli.analysis.finite_weights import non_finite_tensors, require_finite_weights
from flatcli.analysis.progress import ProgressCallback, Task, scoped
from flatcli.analysis.scale import adaptive_sharpness, relative_flatness
from flatcli.analysis.sharpness_report import (
    Density,
    LayerReport,
    Measurement,
    SharpnessReport,
)
from flatcli.config import DENSITY_SEED_OFFSET, SharpnessConfig
from flatcli.curvature.batches import DataSource, StreamedData, TensorData, as_source
from flatcli.curvature.density import slq_density
from flatcli.curvature.exact import (
    exact_spectrum,
    single_linear,
    verified_logistic_regression_hessian,
)
from flatcli.curvature.lanczos import extreme_eigenvalues, lambda_max, lambda_min
from flatcli.curvature.linalg import exact_density
from flatcli.curvature.operator import CurvatureOperator, memory_bounded
from flatcli.curvature.results import Estimate, SpectralDensity
from flatcli.curvature.trace import MIN_SAMPLES, trace_and_frobenius
from flatcli.distributed import my_shard
from flatcli.errors import NonFiniteError, UsageError

__all__ = [
    "DTYPES",
    "MEASURES",
    "PER_LAYER",
    "MeasureContext",
    "measure",
    "non_finite_tensors",
    "parameter_groups",
    "require_finite_weights",
]

#: ``SharpnessConfig.dtype`` -> the precision of the products.
DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: What shared work returns: one estimate, both ends of a spectrum or trace and norm, or
#: a density; each carries the products it spent.
_Work = TypeVar("_Work", Estimate, tuple[Estimate, Estimate], SpectralDensity)
_R = TypeVar("_R")


class MeasureContext:
    """Shared state of one measurement: the operator and work reused across measures.

    Work that several measures read (one Lanczos run for both ends of the spectrum, one
    set of Hutch++ products for trace and Frobenius norm, one dense spectrum) is computed
    once, by :meth:`shared`, which records its Hessian-vector products and which measures
    read it; :meth:`results` then counts each piece of work once, on the first measure
    that read it, and names the others in ``shared_with``. This is the one place where
    shared work is counted.
    """

    def __init__(
        self,
        op: CurvatureOperator,
        config: SharpnessConfig,
        model: nn.Module,
        inputs: torch.Tensor | DataSource,
        targets: torch.Tensor | None,
        closed_form: bool,
        status: Callable[[str], None] | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.op, self.config, self.model = op, config, model
        self.status = status
        self.progress = progress
        # the task now running, which hears the operator's data passes (one call each)
        self._task: Task | None = None
        if progress is not None:
            op.progress = self._passed
        self.inputs, self.targets = inputs, targets
        self.closed_form = closed_form
        self._spectrum: torch.Tensor | None = None
        self._results: dict[str, Measurement] = {}
        self._work: dict[str, object] = {}  # key of shared work -> its result
        self._cost: dict[str, int] = {}  # key of shared work -> its Hessian-vector products
        self._reads: dict[str, frozenset[str]] = {}  # measure -> the shared work it read
        self._reading: list[set[str]] = []  # the work read by the measures being computed
        self.weight_norm = math.sqrt(
            sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
        )

    def get(self, name: str) -> Measurement:
        """The result of measure ``name``, computed once per context (``hvps`` and
        ``shared_with`` not yet counted: see :meth:`results`).
        """
        if name not in self._results:
            self._reading.append(set())
            self._results[name] = MEASURES[name](self)
            self._reads[name] = frozenset(self._reading.pop())
            result = self._results[name]
            if isinstance(result, Estimate):
                self.say(f"{name} {result.value:.6g} ± {result.uncertainty:.2g}")
        if self._reading:  # a measure derived from this one read the same work
            self._reading[-1] |= self._reads[name]
        return self._results[name]

    def shared(
        self,
        key: str,
        compute: Callable[[], _Work],
        *,
        task: str | None = None,
        total: int | None = None,
        unit: str = "HVPs",
        up_to: bool = False,
    ) -> _Work:
        """``compute()``, run once per ``key``; its products and readers are recorded.

        The products are the result's own ``hvps`` (a pair's are those of its one run),
        which include those of a float64 copy of the operator (the Lanczos re-check) that
        ``op.hvps`` does not see. While it runs, the progress callback hears the task
        ``task`` (default ``key``) counted in this operator's products, of ``total``
        planned (see :meth:`counted`).
        """
        if key not in self._work:
            result = self.counted(task or key, compute, total=total, unit=unit, up_to=up_to)
            self._work[key] = result
            self._cost[key] = result[0].hvps if isinstance(result, tuple) else result.hvps
        if self._reading:
            self._reading[-1].add(key)
        return cast(_Work, self._work[key])

    def results(
        self, names: Sequence[str], *, with_spectral_norm: bool = True
    ) -> dict[str, Measurement]:
        """The measures ``names`` (then ``spectral_norm`` when both ends are among them
        and ``with_spectral_norm``), in that order, each with the products it cost.

        Work read by several of them is counted once, in the ``hvps`` of the first that
        read it; each estimate's ``shared_with`` names the others that read any of its
        work, in report order (so for an estimate with ``hvps=0`` and a ``shared_with``,
        the first of them carries the cost). The products of a dense matrix (``exact``)
        are counted by no estimate (the report's total counts them).
        """
        results = {name: self.get(name) for name in names}
        hi, lo = results.get("lambda_max"), results.get("lambda_min")
        if with_spectral_norm and isinstance(hi, Estimate) and isinstance(lo, Estimate):
            results["spectral_norm"] = spectral_norm(hi, lo)
            self._reads["spectral_norm"] = self._reads["lambda_max"] | self._reads["lambda_min"]
        counted: set[str] = set()
        for name, result in results.items():
            reads = self._reads[name]
            hvps = sum(self._cost[key] for key in reads - counted)
            counted |= reads
            if isinstance(result, Estimate):
                partners = tuple(m for m in results if m != name and reads & self._reads[m])
                results[name] = replace(result, hvps=hvps, shared_with=partners)
            else:
                results[name] = replace(result, hvps=hvps)
        return results

    def counted(
        self,
        task: str,
        compute: Callable[[], _R],
        *,
        total: int | None = None,
        unit: str = "HVPs",
        up_to: bool = False,
    ) -> _R:
        """``compute()`` as the progress task ``task``: ``total`` units planned (``up_to``:
        at most), counted in this operator's products from now on (one tick per data
        pass; a Lanczos step is one product). The last tick says what was done.
        """
        if self.progress is None:
            return compute()
        self._task = Task(self.progress, task, total, unit=unit, up_to=up_to, start=self.op.hvps)
        try:
            result = compute()
            self._task.finish()
        finally:
            self._task = None
        return result

    def _passed(self, hvps: int) -> None:
        """The operator's progress callback: its running count, to the task now running."""
        if self._task is not None:
            self._task.update(hvps)

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
            text = ", ".join(f"{v:.6g} ± {b:.2g}" for v, b in zip(values, bounds, strict=True))
            self.say(f"{label} (Lanczos step {step}): {text}")

        return report

    # -- shared work ---------------------------------------------------------------
    def spectrum(self) -> torch.Tensor:
        """Exact eigenvalues (float64, ascending) of the dense matrix.

        Its products are not attributed to any measure (exact values carry ``hvps=0``);
        the report's total counts them.
        """
        if self._spectrum is None:
            # the closed form only for a model verified to be W x.flatten(1) + b
            h = (
                verified_logistic_regression_hessian(self.op, self.model)
                if self.closed_form
                else None
            )
            if h is None:  # the dense matrix, one column per product: P of them
                self._spectrum = self.counted(
                    "exact spectrum", lambda: exact_spectrum(self.op), total=self.op.num_params
                )
            else:  # no product of this operator
                Task(self.progress, "exact spectrum", None).finish(note="closed form")
                self._spectrum = torch.linalg.eigvalsh(h.cpu())
        return self._spectrum

    def lanczos_steps(self) -> int:
        """The most steps (one product each) a Lanczos run may take: ``max_iter``, capped at P."""
        return min(self.config.max_iter, self.op.num_params)

    def trace_and_norm(self) -> tuple[Estimate, Estimate]:
        """Tr H and ||H||_F from ONE block Krylov Hutch++ run (the same products)."""
        c = self.config
        targets = tuple(m for m in ("trace", "frobenius") if m in c.measures)
        # the budget: probes products, or up to 10 x probes with a target (trace.py's
        # default max_hvps); a Krylov space that fills all P dimensions stops sooner
        adaptive = c.target_stderr is not None
        return self.shared(
            "trace_and_norm",
            lambda: trace_and_frobenius(
                self.op,
                probes=c.probes,
                seed=c.seed,
                target_rel_stderr=c.target_stderr,
                targets=targets or ("trace", "frobenius"),
            ),
            task=", ".join(targets) or "trace",
            total=10 * c.probes if adaptive else c.probes,
            up_to=adaptive or self.op.num_params < c.probes,
        )

    def extremes(self) -> tuple[Estimate, Estimate]:
        """Both ends of the spectrum, ``(lambda_min, lambda_max)``, from ONE Lanczos run."""
        c = self.config
        return self.shared(
            "extremes",
            lambda: extreme_eigenvalues(
                self.op,
                tol=c.tol,
                max_iter=c.max_iter,
                seed=c.seed,
                callback=self.lanczos_callback("lambda_min, lambda_max"),
            ),
            task="lambda_min, lambda_max",
            total=self.lanczos_steps(),
            unit="Lanczos steps",
            up_to=True,
        )


def spectral_norm(hi: Estimate, lo: Estimate) -> Estimate:
    """``max(|lambda_max|, |lambda_min|)`` with the larger of the two uncertainties."""
    end = max((hi, lo), key=lambda e: abs(e.value))
    return replace(
        end, value=abs(end.value), uncertainty=max(hi.uncertainty, lo.uncertainty), hvps=0
    )


def _spectrum_end(ctx: MeasureContext, name: str) -> Estimate:
    """``lambda_max`` or ``lambda_min``: exact, from the shared run for both ends when
    both are asked for, or from a run of its own.
    """
    high = name == "lambda_max"
    c = ctx.config
    if c.exact:
        return Estimate(
            value=float(ctx.spectrum()[-1 if high else 0]), uncertainty=0.0, kind="exact"
        )
    if ("lambda_min" if high else "lambda_max") in c.measures:
        return ctx.extremes()[1 if high else 0]
    run = lambda_max if high else lambda_min
    return ctx.shared(
        name,
        lambda: run(
            ctx.op, tol=c.tol, max_iter=c.max_iter, seed=c.seed, callback=ctx.lanczos_callback(name)
        ),
        total=ctx.lanczos_steps(),
        unit="Lanczos steps",
        up_to=True,
    )


def _lambda_max(ctx: MeasureContext) -> Estimate:
    return _spectrum_end(ctx, "lambda_max")


def _lambda_min(ctx: MeasureContext) -> Estimate:
    return _spectrum_end(ctx, "lambda_min")


def _exact(value: torch.Tensor) -> Estimate:
    return Estimate(value=float(value), uncertainty=0.0, kind="exact")


def _trace(ctx: MeasureContext) -> Estimate:
    if ctx.config.exact:
        return _exact(ctx.spectrum().sum())
    return ctx.trace_and_norm()[0]  # converged: >= MIN_SAMPLES remainder samples


def _frobenius(ctx: MeasureContext) -> Estimate:
    if ctx.config.exact:
        return _exact(ctx.spectrum().pow(2).sum().sqrt())
    return ctx.trace_and_norm()[1]


def _density(ctx: MeasureContext) -> Density:
    c = ctx.config
    if c.exact:
        grid, values = exact_density(ctx.spectrum())
        return Density(grid.tolist(), values.tolist())
    est = ctx.shared(
        "density",
        lambda: slq_density(
            ctx.op,
            probes=c.density_probes,
            iterations=c.density_iterations,
            seed=c.seed + DENSITY_SEED_OFFSET,
        ),
        # K probes x m steps; a probe whose Krylov space is invariant stops sooner
        total=c.density_probes * min(c.density_iterations, ctx.op.num_params),
        up_to=True,
    )
    return Density(est.grid.tolist(), est.values.tolist())


def _normalised(base: str) -> Callable[[MeasureContext], Estimate]:
    def compute(ctx: MeasureContext) -> Estimate:
        est = ctx.get(base)
        assert isinstance(est, Estimate)  # the bases are Estimates (MEASURES)
        w2 = ctx.weight_norm**2
        return replace(est, value=est.value * w2, uncertainty=est.uncertainty * w2)

    compute.__doc__ = (
        f"{base} times ||w||^2 (invariant to a global rescaling of a homogeneous model)."
    )
    return compute


def _adaptive_sharpness(ctx: MeasureContext) -> Estimate:
    c = ctx.config
    task = Task(ctx.progress, "adaptive_sharpness", c.sharpness_samples, unit="samples")
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
    task.finish(c.sharpness_samples)
    return Estimate(
        value=est.value,
        uncertainty=est.stderr,
        kind="stderr",
        converged=c.sharpness_samples >= MIN_SAMPLES and math.isfinite(est.stderr),
        samples=c.sharpness_samples,
    )


def _relative_flatness(ctx: MeasureContext) -> Estimate:
    return Estimate(
        value=relative_flatness(ctx.model, ctx.inputs, ctx.targets, batch_size=ctx.op.batch_size),
        uncertainty=0.0,
        kind="exact",
    )


#: name -> function of the context. Order is the order of the report.
MEASURES: dict[str, Callable[[MeasureContext], Measurement]] = {
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


def measure(
    model: nn.Module,
    inputs: torch.Tensor | DataSource | Iterable[Any],
    targets: torch.Tensor | SharpnessConfig | None = None,
    config: SharpnessConfig | None = None,
    *,
    l2: float = 0.0,
    progress: ProgressCallback | None = None,
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
    ``progress`` hears a :class:`~flatcli.analysis.progress.Tick` per data pass of the
    task running (each piece of shared work, with the products it plans: Lanczos steps
    up to ``max_iter``, the Hutch++ budget, SLQ probes x iterations, the P columns of a
    dense matrix; each layer's block with ``per_layer``), ``status`` the current
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
    # NaN/Inf weights: one clear error, not a LinAlgError from the eigensolver
    require_finite_weights(model)
    source = as_source(inputs, targets)  # a stream is read twice here and refused if it changes
    if isinstance(source, StreamedData) and config.bn_mode == "full":
        source = source.gather()  # whole-set statistics: one batch of all N samples, in memory
    if source.streamed and config.batch_size is not None:
        raise UsageError(
            f"batch size {config.batch_size} does not apply to a DataLoader: its own batches "
            "are measured",
            hint="set the loader's batch_size instead",
        )
    data: torch.Tensor | DataSource = source
    labels: torch.Tensor | None = None
    if isinstance(source, TensorData):
        data, labels = source.inputs, source.targets
    coeff = l2 if config.include_l2 else 0.0
    x_part, y_part, op_settings = _operator_settings(model, data, labels, config, coeff)
    op = CurvatureOperator(model, x_part, y_part, **op_settings)
    closed_form = (
        config.exact and config.curvature == "hessian" and single_linear(model) is not None
    )
    ctx = MeasureContext(op, config, model, data, labels, closed_form, status, progress)
    loss, accuracy = op.loss_and_accuracy()
    if not math.isfinite(loss):  # e.g. logits that overflow float32: every HVP would be NaN
        raise NonFiniteError(
            f"the loss is {loss} at these weights (logits overflow {config.dtype}?): "
            "its curvature is undefined"
        )
    try:
        results = ctx.results(config.measures)
    # a non-finite product reached an eigensolver (torch.linalg does not declare the export)
    except torch.linalg.LinAlgError as exc:  # type: ignore[attr-defined]
        raise NonFiniteError(
            f"the curvature is not finite at these weights ({str(exc).splitlines()[0]})"
        ) from None
    layers: list[LayerReport] = []
    hvps = op.hvps
    if config.per_layer:
        groups = parameter_groups(model)
        blocks = Task(progress, "per-layer blocks", len(groups), unit="layers")
        for name, names in groups.items():
            sub = CurvatureOperator(model, x_part, y_part, param_names=names, **op_settings)
            sub_ctx = MeasureContext(
                sub,
                config,
                model,
                data,
                labels,
                closed_form=False,
                progress=scoped(progress, f"layer {name}"),
            )
            wanted = [m for m in config.measures if m in PER_LAYER]
            layer = sub_ctx.results(wanted, with_spectral_norm=False)
            layers.append(LayerReport(name, tuple(names), sub.num_params, layer))
            hvps += sub.hvps
            blocks.update(len(layers))
        blocks.finish()
    # samples measured: op.num_samples counts each process's part, which is all of the tensors on
    # every process when they are not sharded (bn_mode "full", fewer samples than processes)
    n_measured = len(labels) if isinstance(labels, torch.Tensor) else op.num_samples
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
        str(next(model.parameters()).device),
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


def _operator_settings(
    model: nn.Module,
    inputs: torch.Tensor | DataSource,
    targets: torch.Tensor | None,
    config: SharpnessConfig,
    l2: float,
) -> tuple[torch.Tensor | DataSource, torch.Tensor | None, dict[str, Any]]:
    """This process's part of the data and the operator's settings for ``config``.

    Under torchrun each process takes its contiguous shard of tensors (whole batches with
    ``bn_mode="batch"``, all of them with ``"full"``); the batch and vmap chunk come from
    :func:`~flatcli.curvature.operator.memory_bounded` within ``config.memory_gb``.
    """
    dtype = DTYPES[config.dtype]
    # float64 products of a float32 model take twice the memory
    widen = max(1, dtype.itemsize // next(model.parameters()).element_size())
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
    settings: dict[str, Any] = dict(
        curvature=config.curvature,
        bn_mode=config.bn_mode,
        l2=l2,
        dtype=dtype,
        **bounded,
    )
    return x_part, y_part, settings


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameters grouped by the module that owns them (a layer's weight and bias)."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = name.rsplit(".", 1)[0] if "." in name else name
            groups.setdefault(owner, []).append(name)
    return groups
