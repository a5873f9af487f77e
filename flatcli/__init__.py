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
    "build_model": "models",
    "MODELS": "models",
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
    "SharpnessConfig": "analysis.measures",
    "SharpnessReport": "analysis.measures",
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
    from flatcli.analysis.measures import MEASURES, SharpnessConfig, SharpnessReport, measure
    from flatcli.analysis.rank import rank_bound, rank_report
    from flatcli.config import TrainConfig, make_train_config
    from flatcli.errors import FlatcliError
    from flatcli.models import MODELS, build_model
    from flatcli.workflows.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
    from flatcli.workflows.data import DATASETS, load_dataset
    from flatcli.workflows.sharpness import sharpness
    from flatcli.workflows.training import TrainResult, evaluate, train
