"""flatcli: train classifiers and measure the curvature of their loss.

A command-line tool and library to test "Flatness is a False Friend" (Granziol 2020)
on your own models. See README.md for the commands; the public Python API is below.

The names are imported on first use (PEP 562), so that ``import flatcli`` and the
command line's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # data and models
    "load_dataset": "data", "DATASETS": "data", "build_model": "models", "MODELS": "models",
    # training and checkpoints
    "train": "training", "TrainResult": "training", "evaluate": "training",
    "TrainConfig": "config", "make_train_config": "config",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "CheckpointInfo": "checkpoint",
    # curvature
    "sharpness": "sharpness", "measure": "measures", "SharpnessConfig": "measures",
    "SharpnessReport": "measures", "MEASURES": "measures", "rank_bound": "rank", "rank_report": "rank",
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


class _Package(types.ModuleType):
    """The package, whose public names win over submodules of the same name.

    Importing a submodule binds it on its package (``flatcli.sharpness`` would become
    the module ``flatcli/sharpness.py``); the public API's function of that name stays.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
    from .config import TrainConfig, make_train_config
    from .data import DATASETS, load_dataset
    from .errors import FlatcliError
    from .measures import MEASURES, SharpnessConfig, SharpnessReport, measure
    from .models import MODELS, build_model
    from .rank import rank_bound, rank_report
    from .sharpness import sharpness
    from .training import TrainResult, evaluate, train
