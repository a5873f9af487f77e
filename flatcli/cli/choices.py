"""The closed sets of names an option accepts, as ``Literal`` types that Typer shows and checks.

An option annotated with one of these types lists its values in ``--help``
(``<hessian|ggn>``), rejects any other value with a usage error (exit code 2) that names
the valid ones, and offers the values to shell completion; the command receives the
plain string the library takes. Each type is built from a torch-free tuple of names, so
that ``flatcli --help`` imports no torch. The names of the data sets, models and
schedules live in registries that import torch (``flatcli.workflows.data.DATASETS``,
``flatcli.models.registry.MODELS``, ``flatcli.workflows.training.SCHEDULES``): they are
repeated here, and a test holds each tuple equal to its registry. For mypy each type is
``str``: a Literal built from a tuple is a runtime object it cannot read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from flatcli.config import BN_MODES, CURVATURE_NAMES, DEFAULT_LR, DTYPE_NAMES, RECIPES

#: ``flatcli.workflows.data.DATASETS``'s names, in its order.
DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")
#: ``flatcli.models.registry.model_names()``: the model zoo, in registration order.
MODEL_NAMES: tuple[str, ...] = ("logreg", "mlp", "cnn", "vgg16", "preresnet", "wrn")
#: ``flatcli.workflows.training.OPTIMIZERS``'s names (the keys of the default learning rates).
OPTIMIZER_NAMES: tuple[str, ...] = tuple(DEFAULT_LR)
#: ``flatcli.workflows.training.SCHEDULES``'s names.
SCHEDULE_NAMES: tuple[str, ...] = ("constant", "cosine", "paper")
#: The paper's recipes (:data:`flatcli.config.RECIPES`).
RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)
#: ``flatcli.workflows.data.SPLITS``.
SPLIT_NAMES: tuple[str, ...] = ("train", "test")
#: The layers a weight-scaling sweep scales (``flatcli.analysis.sweep.scaling_sweep``).
SCALE_LAYERS: tuple[str, ...] = ("all", "last")
#: ``--format``: the console's tables, then ``flatcli.report.formats.RENDERERS``' names,
#: then the JSON document (``flatcli.report.schema``).
FORMAT_NAMES: tuple[str, ...] = ("table", "markdown", "csv", "json")
#: ``demo --protocol``: the demo's contrasts, or the paper's protocol
#: (``flatcli.workflows.protocol``).
PROTOCOL_NAMES: tuple[str, ...] = ("demo", "paper")
#: ``flatcli.workflows.protocol.PROTOCOL_MODELS``' and ``ARMS``' names, in their order.
PROTOCOL_MODEL_NAMES: tuple[str, ...] = ("vgg16", "vgg16-bn", "preresnet", "wrn")
ARM_NAMES: tuple[str, ...] = ("sgd", "sgd-l2", "swa", "adam", "adamw", "gadam")

if TYPE_CHECKING:
    DatasetName = str
    ModelName = str
    OptimizerName = str
    ScheduleName = str
    RecipeName = str
    CurvatureName = str
    BnModeName = str
    DtypeName = str
    SplitName = str
    ScaleLayer = str
    FormatName = str
    ProtocolName = str
else:
    DatasetName = Literal[DATASET_NAMES]
    ModelName = Literal[MODEL_NAMES]
    OptimizerName = Literal[OPTIMIZER_NAMES]
    ScheduleName = Literal[SCHEDULE_NAMES]
    RecipeName = Literal[RECIPE_NAMES]
    CurvatureName = Literal[CURVATURE_NAMES]
    BnModeName = Literal[BN_MODES]
    DtypeName = Literal[DTYPE_NAMES]
    SplitName = Literal[SPLIT_NAMES]
    ScaleLayer = Literal[SCALE_LAYERS]
    FormatName = Literal[FORMAT_NAMES]
    ProtocolName = Literal[PROTOCOL_NAMES]
