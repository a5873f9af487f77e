"""What ``flatcli sharpness`` measured at one point in weight space, and its JSON.

A :class:`SharpnessReport` holds the point (data, settings, the loss and accuracy on the
measured ``split``, ||w||), one
result per measure (an :class:`~flatcli.curvature.results.Estimate`, or a
:class:`Density` for the spectral density), optionally the same per layer
(:class:`LayerReport`), and the Hessian-vector products spent. :meth:`SharpnessReport.as_dict`
is the body of the JSON document of ``flatcli sharpness --json`` (the envelope and its
schema are :mod:`flatcli.report.schema`) and of the ``sharpness.json`` cache;
:meth:`SharpnessReport.from_dict` reads it back. The loss and accuracy of the point are
``split_loss`` and ``split_accuracy`` in the JSON: they are on ``split`` (the data the
matrix is averaged over), never to be read as a run's ``train_accuracy`` or
``test_accuracy``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from flatcli.config import MEASURE_NAMES
from flatcli.curvature.results import Estimate, EstimateKind


@dataclass(frozen=True)
class Density:
    """A spectral density sampled on a grid (its values integrate to 1 over it).

    Attributes:
        grid: evaluation points, ascending.
        values: the density at ``grid``.
        hvps: Hessian-vector products spent on it (0 when read from the JSON).
    """

    grid: list[float]
    values: list[float]
    hvps: int = 0

    def as_dict(self) -> dict[str, list[float]]:
        """The JSON form: ``grid`` and ``values``."""
        return {"grid": self.grid, "values": self.values}


#: One measure's result: a number with its uncertainty, or a spectral density.
Measurement = Estimate | Density


@dataclass(frozen=True)
class LayerReport:
    """The measures of one layer's diagonal block of the matrix.

    Attributes:
        name: the module owning the parameters (``parameter_groups``).
        params: the parameter names of the block.
        num_params: the block's size.
        measures: measure name -> result.
    """

    name: str
    params: tuple[str, ...]
    num_params: int
    measures: dict[str, Measurement]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: name, params, num_params, then one entry per measure."""
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
    measures: dict[str, Measurement]
    hvps: int
    seconds: float
    exact: bool = False
    layers: list[LayerReport] = field(default_factory=list)
    #: The measures served from ``sharpness.json`` (not computed by this call); see
    #: ``flatcli.workflows.sharpness``.
    cached: tuple[str, ...] = ()
    #: The batch whose statistics define the matrix (SharpnessConfig.bn_batch_size; with
    #: bn_mode "full" all num_samples); None with running statistics (bn_mode "eval").
    bn_batch_size: int | None = None
    #: What the result was computed with (``flatcli.workflows.provenance``): the device,
    #: versions, command line, time and git commit of the call that returned the report;
    #: the last key of the JSON. Never cached: a report from ``sharpness.json`` carries
    #: the provenance of the call that asked for it. None when not recorded.
    provenance: Mapping[str, object] | None = None

    @property
    def fully_cached(self) -> bool:
        """Every measure came from the cache (this call did no Hessian-vector product)."""
        return bool(self.cached) and set(self.measures) <= set(self.cached)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON: :meth:`as_dict`."""
        return self.as_dict()

    def as_dict(self) -> dict[str, Any]:
        """The body of ``flatcli sharpness --json`` (key order included): the point, one
        entry per measure (an ``Estimate.as_dict()``, or the density's grid and values),
        then layers, costs and provenance. :func:`flatcli.report.text.sharpness_as_dict`
        puts it in the envelope of :mod:`flatcli.report.schema`.
        """
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
            )
        }
        head["split_loss"] = self.loss
        head["split_accuracy"] = self.accuracy
        head["weight_norm"] = self.weight_norm
        head["include_l2"] = self.l2
        head["exact"] = self.exact
        head["bn_batch_size"] = self.bn_batch_size
        body = {k: v.as_dict() for k, v in self.measures.items()}
        tail: dict[str, Any] = {
            "hvps": self.hvps,
            "seconds": self.seconds,
            "cached": self.fully_cached,
        }
        if self.cached and not self.fully_cached:  # some from the cache, the rest computed now
            tail["cached_measures"] = list(self.cached)
        if self.layers:
            tail = {"layers": [layer.as_dict() for layer in self.layers], **tail}
        if self.provenance is not None:
            tail["provenance"] = dict(self.provenance)
        return {**head, **body, **tail}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharpnessReport:
        """Rebuild a report from :meth:`as_dict` (used by the ``sharpness.json`` cache), or
        from the whole document of ``flatcli sharpness --json`` (the envelope is ignored).
        """
        measures = {
            name: measurement_from_dict(value)
            for name, value in d.items()  # in the document's order (the order asked for)
            if name in MEASURE_NAMES or name == "spectral_norm"
        }
        layers = [
            LayerReport(
                x["name"],
                tuple(x["params"]),
                x["num_params"],
                {k: measurement_from_dict(v) for k, v in x.items() if isinstance(v, dict)},
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
            d["split_loss"],
            d["split_accuracy"],
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


def measurement_from_dict(d: dict[str, Any]) -> Measurement:
    """One measure's result from its JSON form (``as_dict`` of an Estimate or Density).

    The form of flatcli 0.2 and earlier (``{value, bound, converged}`` or ``{value,
    stderr, converged}``) is read too, each key for the kind it named (a zero bound being
    an exact value), so that a document written then is not misread; anything else is a
    :class:`ValueError`.
    """
    if "grid" in d:
        return Density(d["grid"], d["values"])
    # An entry without the flag cannot vouch for itself: only an exact value is trusted.
    if "kind" in d:
        if d["kind"] not in get_args(EstimateKind):
            raise ValueError(f"an estimate of unknown kind {d['kind']!r}")
        return Estimate(
            value=float(d["value"]),
            uncertainty=_number(d["uncertainty"]),
            kind=d["kind"],
            converged=d.get("converged", d["kind"] == "exact") is True,
        )
    converged = d.get("converged", "bound" in d and d["bound"] == 0) is True
    if "stderr" in d:
        return Estimate(
            value=d["value"], uncertainty=_number(d["stderr"]), kind="stderr", converged=converged
        )
    if "bound" in d:
        return Estimate(
            value=d["value"],
            uncertainty=_number(d["bound"]),
            kind="bound" if d["bound"] else "exact",
            converged=converged,
        )
    raise ValueError(f"not an estimate: keys {sorted(d)}")


def _number(uncertainty: object) -> float:
    """An uncertainty from JSON: a number, ``"inf"`` (infinite) or ``null`` (NaN)."""
    if uncertainty is None:
        return math.nan
    if isinstance(uncertainty, str) and uncertainty == "inf":
        return math.inf
    if isinstance(uncertainty, bool) or not isinstance(uncertainty, (int, float)):
        raise ValueError(f"an uncertainty must be a number, 'inf' or null, not {uncertainty!r}")
    return float(uncertainty)
