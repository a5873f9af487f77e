"""The weight-scaling sweep: the paper's mechanism made visible.

Multiply the weights (of every layer, or only the last) by a factor a and measure again.
For a ReLU network whose layers are all scaled, the logits grow like a^L (exactly, when
there are no biases); a model that classifies its training data well then becomes more
confident, its loss falls and its Hessian shrinks, while its predictions, hence its
accuracy, do not change (Granziol 2020, sec. 3; Dinh et al. 2017). For logistic
regression the sweep has a closed form: H(a w) = (1/N) sum_i A_i(a) kron x_i x_i^T with
A_i(a) = diag p_i - p_i p_i^T at logits a z_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from flatcli.analysis.measures import DTYPES, measure, non_finite_tensors
from flatcli.analysis.progress import ProgressCallback, Task, scoped
from flatcli.analysis.scale import scale_weights
from flatcli.config import SharpnessConfig
from flatcli.curvature.results import Estimate
from flatcli.errors import NonFiniteError, UsageError

SWEEP_MEASURES = ("lambda_max", "trace", "frobenius")


@dataclass(frozen=True)
class SweepRow:
    """One factor of the sweep: the scaled model's loss, accuracy, ``||w||`` and measures."""

    scale: float
    loss: float
    accuracy: float
    weight_norm: float
    measures: dict[str, Estimate]

    def as_dict(self) -> dict[str, object]:
        """The row as JSON: the factor, the scaled model's ``split_loss`` and
        ``split_accuracy`` (on the measured split, as in ``flatcli sharpness``), ``||w||``,
        then each measure's ``Estimate.as_dict()``.
        """
        return {
            "scale": self.scale,
            "split_loss": self.loss,
            "split_accuracy": self.accuracy,
            "weight_norm": self.weight_norm,
            **{k: v.as_dict() for k, v in self.measures.items()},
        }


def parse_scales(text: str) -> tuple[float, ...]:
    """The factors of ``--scale``: a comma-separated list of positive numbers."""
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--scale {text!r} is not a comma-separated list of numbers") from None
    if not scales or any(not s > 0 for s in scales):
        raise UsageError("--scale factors must be positive numbers")
    return scales


def scaling_sweep(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    scales: Sequence[float],
    config: SharpnessConfig,
    *,
    layers: str = "all",
    progress: ProgressCallback | None = None,
) -> list[SweepRow]:
    """Loss, accuracy and sharpness of ``model`` with its weights scaled by each factor.

    ``progress`` hears the task ``scale sweep`` over the factors (``i/len(scales)``
    points) and, within each, the measures' own tasks named ``"scale A: ..."``.
    """
    if layers not in ("all", "last"):
        raise UsageError(f"--scale-layer {layers!r}: use all or last")
    measures = tuple(m for m in config.measures if m in SWEEP_MEASURES) or SWEEP_MEASURES
    config = replace(config, measures=measures, per_layer=False)
    for a in scales:  # every factor is checked before anything is measured
        check_scale(
            model,
            inputs,
            targets,
            a,
            layers=layers,
            dtype=config.dtype,
            batch_size=config.batch_size,
        )
    rows = []
    points = Task(progress, "scale sweep", len(scales), unit="points")
    for a in scales:
        try:
            report = measure(
                scale_weights(model, a, layers=layers),
                inputs,
                targets,
                config,
                progress=scoped(progress, f"scale {a:g}"),
            )
        except NonFiniteError as exc:
            raise UsageError(f"--scale {a:g}: {exc.message}", hint="use smaller factors") from None
        rows.append(
            SweepRow(
                a,
                report.loss,
                report.accuracy,
                report.weight_norm,
                {
                    k: v
                    for k, v in report.measures.items()
                    if k in SWEEP_MEASURES and isinstance(v, Estimate)
                },
            )
        )
        points.update(len(rows))
    points.finish()
    return rows


def check_scale(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    factor: float,
    *,
    layers: str = "all",
    dtype: str = "float32",
    batch_size: int | None = None,
) -> None:
    """Refuse (:class:`UsageError`) a factor whose scaled weights, or whose loss, are not finite
    in ``dtype``: e.g. 1e30 on a two-layer network gives logits near 1e60, beyond float32.
    """
    scaled = scale_weights(model, factor, layers=layers)
    bad = non_finite_tensors(scaled)
    if bad:
        raise UsageError(
            f"--scale {factor:g}: the scaled weights overflow {next(scaled.parameters()).dtype} "
            f"in {', '.join(bad[:3])}",
            hint="use smaller factors",
        )
    first = next(scaled.parameters())
    scaled = scaled.to(DTYPES[dtype])
    total = torch.zeros((), dtype=torch.float64)
    step = batch_size or 1024
    with torch.no_grad():
        for start in range(0, len(targets), step):
            x = inputs[start : start + step].to(first.device, DTYPES[dtype])
            y = targets[start : start + step].to(first.device)
            total += torch.nn.functional.cross_entropy(scaled(x), y, reduction="sum").double().cpu()
    if not torch.isfinite(total):
        raise UsageError(
            f"--scale {factor:g}: the loss is {float(total)} at the scaled weights "
            f"(the logits overflow {dtype})",
            hint="use smaller factors",
        )
