"""flatcli: train classifiers and measure the curvature of their loss.

A command-line tool and library to test "Flatness is a False Friend" (Granziol 2020)
on your own models. See README.md for the commands; the public Python API is below.

The names are imported on first use (PEP 562), so that ``import flatcli`` and the
command line's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # data and models
    "load_dataset": "workflows.data",
    "DATASETS": "workflows.data",
    "build_model": "models.registry",
    "MODELS": "models.registry",
    # training and checkpoints
    "train": "workflows.training",
    "TrainResult": "workflows.training",
    "evaluate": "workflows.training",
    "TrainConfig": "config",
    "make_train_config": "config",
    "load_checkpoint": "workflows.checkpoint",
    "save_checkpoint": "workflows.checkpoint",
    "CheckpointInfo": "workflows.checkpoint",
    # curvature
    "sharpness": "workflows.sharpness",
    "measure": "analysis.measures",
    "SharpnessConfig": "config",
    "SharpnessReport": "analysis.sharpness_report",
    "MEASURES": "analysis.measures",
    "rank_bound": "analysis.rank",
    "rank_report": "analysis.rank",
    # errors
    "FlatcliError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flatcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from flatcli.analysis.measures import MEASURES as MEASURES
    from flatcli.analysis.measures import measure as measure
    from flatcli.analysis.rank import rank_bound as rank_bound
    from flatcli.analysis.rank import rank_report as rank_report
    from flatcli.analysis.sharpness_report import SharpnessReport as SharpnessReport
    from flatcli.config import SharpnessConfig as SharpnessConfig
    from flatcli.config import TrainConfig as TrainConfig
    from flatcli.config import make_train_config as make_train_config
    from flatcli.errors import FlatcliError as FlatcliError
    from flatcli.models.registry import MODELS as MODELS
    from flatcli.models.registry import build_model as build_model
    from flatcli.workflows.checkpoint import CheckpointInfo as CheckpointInfo
    from flatcli.workflows.checkpoint import load_checkpoint as load_checkpoint
    from flatcli.workflows.checkpoint import save_checkpoint as save_checkpoint
    from flatcli.workflows.data import DATASETS as DATASETS
    from flatcli.workflows.data import load_dataset as load_dataset
    from flatcli.workflows.sharpness import sharpness as sharpness
    from flatcli.workflows.training import TrainResult as TrainResult
    from flatcli.workflows.training import evaluate as evaluate
    from flatcli.workflows.training import train as train
