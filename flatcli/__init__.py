"""flatcli: train classifiers and measure the curvature of their loss.

A command-line tool and library to test "Flatness is a False Friend" (Granziol 2020)
on your own models. See README.md for the commands; the public Python API is below.
"""

__version__ = "0.2.0"

from .checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from .config import TrainConfig, make_train_config
from .data import DATASETS, load_dataset
from .errors import FlatcliError
from .measures import MEASURES, SharpnessConfig, SharpnessReport, measure
from .models import MODELS, build_model
from .rank import rank_bound, rank_report
from .sharpness import sharpness
from .training import TrainResult, evaluate, train

__all__ = [
    # data and models
    "load_dataset", "DATASETS", "build_model", "MODELS",
    # training and checkpoints
    "train", "TrainConfig", "make_train_config", "TrainResult", "evaluate",
    "load_checkpoint", "save_checkpoint", "CheckpointInfo",
    # curvature
    "sharpness", "measure", "SharpnessConfig", "SharpnessReport", "MEASURES", "rank_bound", "rank_report",
    # errors
    "FlatcliError",
]
