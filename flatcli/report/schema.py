"""The one JSON schema of flatcli's documents: the envelope of every ``--json``, and its JSON Schema.

Every command prints with ``--json`` (or ``--format json``) exactly one object::

    {"schema_version": 1, "flatcli_version": "0.2.0", "command": "sharpness",
     ...the command's body...,
     "provenance": {"device": "cpu", "python": ..., "torch": ..., ...}}

:func:`document` builds it around a body; :data:`JSON_SCHEMA` (draft 2020-12, also
:func:`json_schema` and :func:`schema_text`) describes the envelope and each command's body.
The bodies share three definitions:

* ``estimate``: every number with an uncertainty, ``{value, uncertainty, kind,
  converged}``, whatever estimator made it
  (:meth:`flatcli.curvature.results.Estimate.as_dict`). ``kind`` says what ``uncertainty``
  is: a rigorous ``"bound"`` (a Ritz residual or gap bound), a ``"stderr"`` (a standard
  error) or 0 for an ``"exact"`` value; ``"inf"`` is an infinite uncertainty and ``null``
  an unknown one (a standard error of one sample). ``converged: false`` says the
  uncertainty is not what its kind promises (a Lanczos run stopped by ``--max-iter``, a
  standard error of too few samples): such a value gets no verdict.
* ``density``: a spectral density, ``{grid, values}`` (values integrate to 1 over grid).
* ``provenance``: what the numbers were computed with (the resolved device, versions, the
  command line, the time, the git commit; :mod:`flatcli.workflows.provenance`).

Names have one meaning in every document: ``train_accuracy``/``test_accuracy`` (and the
losses) are a run's final metrics on its training and test sets; ``split_loss``/
``split_accuracy`` are the loss and accuracy on the data a matrix is measured on (the
document's ``split``). ``effective_rank`` is always a list of estimates with their
``fraction``. A change of a key's name or meaning raises :data:`SCHEMA_VERSION`; a new
optional key does not. Values JSON cannot hold are written as ``"inf"``/``"-inf"`` and
``null`` (NaN) by the printer (:func:`flatcli.cli._common.print_json`).

The definitions follow the README's section "JSON output"; the measures are those of
:data:`flatcli.config.MEASURE_NAMES` (docs/architecture.md, "Adding a measure").
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping

from flatcli import __version__
from flatcli.config import MEASURE_NAMES

__all__ = [
    "COMMANDS",
    "ENVELOPE_KEYS",
    "JSON_SCHEMA",
    "SCHEMA_VERSION",
    "document",
    "is_document",
    "json_schema",
    "schema_text",
]

#: Version of the documents' layout (see the module docstring for when it changes).
SCHEMA_VERSION = 1

#: The commands that print a document, the values of its ``command`` key.
COMMANDS: tuple[str, ...] = ("train", "sharpness", "rank-bound", "compare", "demo")

#: The keys every document starts with, in order (``provenance`` is its last key).
ENVELOPE_KEYS: tuple[str, ...] = ("schema_version", "flatcli_version", "command")

#: The measures of a sharpness document: every measure that is one number, and the implied
#: spectral norm (both ends of the spectrum asked for).
_ESTIMATE_MEASURES: tuple[str, ...] = (
    *(m for m in MEASURE_NAMES if m != "density"),
    "spectral_norm",
)


def document(
    command: str, body: Mapping[str, object], provenance: Mapping[str, object] | None = None
) -> dict[str, object]:
    """The document of ``command``: the envelope's keys, the body, then its provenance.

    ``provenance`` defaults to the body's own ``provenance`` key (moved to the end); a
    document without one is a :class:`ValueError`, as is an unknown command (both are
    programming errors, never a user's).
    """
    if command not in COMMANDS:
        raise ValueError(f"no document for command {command!r}; one of {', '.join(COMMANDS)}")
    rest = {k: v for k, v in body.items() if k != "provenance" and k not in ENVELOPE_KEYS}
    record = provenance if provenance is not None else body.get("provenance")
    if not isinstance(record, Mapping):
        raise ValueError(f"the {command} document has no provenance")
    return {
        "schema_version": SCHEMA_VERSION,
        "flatcli_version": __version__,
        "command": command,
        **rest,
        "provenance": dict(record),
    }


def is_document(value: object) -> bool:
    """``value`` is an enveloped document of this schema version (what ``print_json`` prints)."""
    return (
        isinstance(value, Mapping)
        and list(value)[: len(ENVELOPE_KEYS)] == list(ENVELOPE_KEYS)
        and value["schema_version"] == SCHEMA_VERSION
        and value["command"] in COMMANDS
        and list(value)[-1] == "provenance"
    )


# --- the JSON Schema ----------------------------------------------------------------------

_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 0}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
_STRING = {"type": "string"}
_BOOL = {"type": "boolean"}
_OPTIONAL_STRING = {"type": ["string", "null"]}
_ESTIMATE_REF = {"$ref": "#/$defs/estimate"}


def _object(required: Mapping[str, object], **optional: object) -> dict[str, object]:
    """An object schema: the ``required`` keys with their schemas, and optional ones."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **optional},
    }


_ESTIMATE_FIELDS = _object(
    {
        "value": _NUMBER,
        "uncertainty": {
            "oneOf": [{"type": "number", "minimum": 0}, {"const": "inf"}, {"type": "null"}]
        },
        "kind": {"enum": ["bound", "stderr", "exact"]},
        "converged": _BOOL,
    },
    hvps=_COUNT,
)

_MEASURES = {m: _ESTIMATE_REF for m in _ESTIMATE_MEASURES} | {
    "density": {"$ref": "#/$defs/density"}
}

_LAYER = _object(
    {"name": _STRING, "params": {"type": "array", "items": _STRING}, "num_params": _COUNT},
    **_MEASURES,
)

_SHARPNESS_POINT = {
    **_object(
        {
            "checkpoint": _OPTIONAL_STRING,
            "dataset": _OPTIONAL_STRING,
            "split": {"enum": ["train", "test"]},
            "num_samples": _COUNT,
            "num_params": _COUNT,
            "curvature": _STRING,
            "bn_mode": _STRING,
            "dtype": _STRING,
            "device": _STRING,
            "seed": {"type": "integer"},
            "split_loss": _NUMBER,
            "split_accuracy": _FRACTION,
            "weight_norm": _NUMBER,
            "include_l2": _NUMBER,
            "exact": _BOOL,
            "bn_batch_size": {"type": ["integer", "null"]},
            "hvps": _COUNT,
            "seconds": _NUMBER,
            "cached": _BOOL,
        },
        cached_measures={"type": "array", "items": _STRING},
        layers={"type": "array", "items": _LAYER},
        **_MEASURES,
    ),
    "not": {"required": ["rows"]},
}

_SWEEP_ROW = {
    **_object(
        {
            "scale": {"type": "number", "exclusiveMinimum": 0},
            "split_loss": _NUMBER,
            "split_accuracy": _FRACTION,
            "weight_norm": _NUMBER,
        }
    ),
    "additionalProperties": _ESTIMATE_REF,  # one estimate per measure
}

_SHARPNESS_SWEEP = _object(
    {
        "split": {"enum": ["train", "test"]},
        "scale_layer": {"enum": ["all", "last"]},
        "rows": {"type": "array", "items": {"$ref": "#/$defs/sweep_row"}},
    }
)

_RANKS = {"type": "array", "items": {"$ref": "#/$defs/ranked_estimate"}}

_RANK = _object(
    {
        "num_params": _COUNT,
        "num_classes": _COUNT,
        "num_samples": _COUNT,
        "layers": {
            "type": "array",
            "items": _object(
                {"name": _STRING, "kind": _STRING, "fan_in": _COUNT, "neurons": _COUNT}
            ),
        },
        "paper_bound": _COUNT,
        "data_bound": _COUNT,
        "min_bound": _COUNT,
        "bound_fraction": _NUMBER,
        "paper_fraction": _NUMBER,
        "linear_model": _BOOL,
        "exact": _BOOL,
        "numerical_rank": {"type": ["integer", "null"]},
        "ggn_rank": {"type": ["integer", "null"]},
        "effective_rank": _RANKS,
        "statement": _STRING,
    },
    threshold=_NUMBER,
    ggn_effective_rank=_RANKS,
)

#: An arm's test accuracy as its verdicts judge it: the estimate, and where its noise came from.
_JUDGED_ACCURACY = {
    "$ref": "#/$defs/estimate_fields",
    **_object(
        {
            "value": _FRACTION,
            "source": {"enum": ["seeds", "epochs", "binomial"]},
            "count": _COUNT,
        }
    ),
    "unevaluatedProperties": False,
}

#: A quantity averaged over an arm's seeds: its mean as the estimate's value, the standard
#: error as its uncertainty, with the sample standard deviation and the number of runs.
_SPREAD = {
    "$ref": "#/$defs/estimate_fields",
    **_object({"sd": {"type": ["number", "null"]}, "n": {"type": "integer", "minimum": 1}}),
    "unevaluatedProperties": False,
}

_COMPARED_RUN = _object(
    {
        "name": _STRING,
        "optimizer": _STRING,
        "train_loss": _NUMBER,
        "test_loss": _NUMBER,
        "train_accuracy": _FRACTION,
        "test_accuracy": _FRACTION,
        "weight_norm": _NUMBER,
        "n": {"type": "integer", "minimum": 1},
        "runs": {"type": "array", "minItems": 1, "items": _STRING},
        "judged_accuracy": {"oneOf": [_JUDGED_ACCURACY, {"type": "null"}]},
        "spread": {"type": "object", "additionalProperties": _SPREAD},
    },
    **_MEASURES,
)

_COMPARISON = _object(
    {
        "runs": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/compared_run"}},
        "ratios": {"type": "array", "items": {"type": "object"}},
        "verdicts": {"type": "array", "items": {"type": "object"}},
    }
)

_TRAIN = _object(
    {
        "train_loss": _NUMBER,
        "train_accuracy": _FRACTION,
        "test_loss": _NUMBER,
        "test_accuracy": _FRACTION,
        "weight_norm": _NUMBER,
        "epochs": _COUNT,
        "seconds": _NUMBER,
        "checkpoint": _STRING,
        "run_dir": _STRING,
    }
)

_DEMO = _object(
    {
        "dataset": _STRING,
        "models": {"type": "array", "items": _STRING},
        "seeds": {"type": "integer", "minimum": 1},
        "runs": {"type": "object", "additionalProperties": _STRING},
        "comparisons": {
            "type": "array",
            "items": {
                "allOf": [
                    _object({"model": _STRING, "contrast": _STRING}),
                    {"$ref": "#/$defs/comparison"},
                ]
            },
        },
        "rank": {"type": "object", "additionalProperties": {"$ref": "#/$defs/rank-bound"}},
        "sweep": _object(
            {
                "model": _OPTIONAL_STRING,
                "rows": {"type": "array", "items": {"$ref": "#/$defs/sweep_row"}},
            }
        ),
        "claims": {
            "type": "array",
            "items": _object(
                {
                    "claim": _STRING,
                    "model": _STRING,
                    "held": {"type": ["boolean", "null"]},
                    "evidence": _STRING,
                }
            ),
        },
        "seconds": _NUMBER,
    }
)

#: ``flatcli demo --protocol paper``: its plan (``--dry-run``) or its results
#: (:mod:`flatcli.report.protocol` says what each run holds; its estimates are ``estimate``).
_PROTOCOL = _object(
    {
        "protocol": {"const": "paper"},
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"lambda_max": _ESTIMATE_REF, "trace": _ESTIMATE_REF},
            },
        },
    }
)

_PROVENANCE = _object(
    {
        "device": _STRING,
        "python": _STRING,
        "torch": _STRING,
        "cuda": _OPTIONAL_STRING,
        "command": {"type": "array", "items": _STRING},
        "time": _STRING,
        "git_commit": _OPTIONAL_STRING,
    }
)

#: The JSON Schema (draft 2020-12) of every document (see the module docstring).
JSON_SCHEMA: dict[str, object] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "flatcli JSON document",
    "description": "What a flatcli command prints with --json: the envelope, the command's "
    "body, then provenance.",
    **_object(
        {
            "schema_version": {"const": SCHEMA_VERSION},
            "flatcli_version": _STRING,
            "command": {"enum": list(COMMANDS)},
            "provenance": {"$ref": "#/$defs/provenance"},
        }
    ),
    "allOf": [
        {
            "if": {"properties": {"command": {"const": c}}, "required": ["command"]},
            "then": {"$ref": f"#/$defs/{c}"},
        }
        for c in COMMANDS
    ],
    "$defs": {
        "estimate": {"$ref": "#/$defs/estimate_fields", "unevaluatedProperties": False},
        "estimate_fields": _ESTIMATE_FIELDS,
        "ranked_estimate": {
            "$ref": "#/$defs/estimate_fields",
            "properties": {"fraction": {"type": "number", "exclusiveMinimum": 0}},
            "required": ["fraction"],
            "unevaluatedProperties": False,
        },
        "density": {
            **_object(
                {
                    "grid": {"type": "array", "items": _NUMBER},
                    "values": {"type": "array", "items": _NUMBER},
                }
            ),
            "additionalProperties": False,
        },
        "provenance": _PROVENANCE,
        "sweep_row": _SWEEP_ROW,
        "compared_run": _COMPARED_RUN,
        "comparison": _COMPARISON,
        "train": _TRAIN,
        "sharpness": {"oneOf": [_SHARPNESS_POINT, _SHARPNESS_SWEEP]},
        "rank-bound": _RANK,
        "compare": _COMPARISON,
        "demo": {"oneOf": [{**_DEMO, "not": {"required": ["protocol"]}}, _PROTOCOL]},
    },
}


def json_schema() -> dict[str, object]:
    """A copy of :data:`JSON_SCHEMA` (to validate against, or to publish)."""
    return copy.deepcopy(JSON_SCHEMA)


def schema_text() -> str:
    """:data:`JSON_SCHEMA` as indented JSON text."""
    return json.dumps(JSON_SCHEMA, indent=2)
