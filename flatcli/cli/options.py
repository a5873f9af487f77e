"""Options shared by several commands, declared once as ``Annotated`` aliases.

Each alias carries the option's flags and help; the command's signature gives the
default, read from the configuration classes of :mod:`flatcli.config` (for example
``tol: Tol = SharpnessConfig.tol``), so that a default is written in one place only.
This module imports no torch: ``flatcli --help`` must stay fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from flatcli.cli.choices import (
    BnModeName,
    CurvatureName,
    DatasetName,
    DtypeName,
    FormatName,
    SplitName,
)
from flatcli.config import MEASURE_NAMES, SharpnessConfig, TrainConfig
from flatcli.errors import UsageError
from flatcli.workflows.source import CheckpointSource

P = ParamSpec("P")
R = TypeVar("R")

#: The device of every command unless ``--device`` says otherwise.
DEFAULT_DEVICE = TrainConfig.device
#: ``--measures`` of ``flatcli sharpness`` unless given.
DEFAULT_MEASURES = ",".join(SharpnessConfig.measures)

# --- the panels of --help, the same on every command --------------------------------------

#: What is measured or trained on.
DATA = "Data"
#: The model: architecture, or how a foreign checkpoint's model is built.
MODEL = "Model"
#: How a model is trained.
OPTIMISER = "Optimiser"
#: How curvature is estimated.
ESTIMATOR = "Estimator"
#: What is printed or written, and where.
OUTPUT = "Output"
#: Device, seed and caching.
PROCESSES = "Processes"

#: Every command's context: ``-h`` as well as ``--help``.
CONTEXT = {"help_option_names": ["-h", "--help"]}

#: The metavar of an on/off flag: none (Typer would show ``<bool>`` after it in the help).
FLAG = ""


class _FlagHelp:
    """``-h/--help`` shown as a flag (Typer would show ``<bool>`` after it)."""

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        """The help option, without a type."""
        option: TyperOption | None = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = FLAG
        return option


class Command(_FlagHelp, TyperCommand):
    """Typer's command with a help that shows no types where they say nothing: ``-h/--help``
    without ``<bool>``, and an argument with a metavar (``RUN``) without its Python type
    (Typer shows ``<list[Path]>`` there whatever the metavar).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument) and param.metavar:
                param.display_type_rich = _no_type  # type: ignore[method-assign,assignment]


class Group(_FlagHelp, TyperGroup):
    """Typer's group of commands (``flatcli`` itself), its ``-h/--help`` shown as a flag."""


def _no_type(ctx: typer.Context) -> None:
    """No type in the help's type column."""
    return None


# --- data, device and output ------------------------------------------------------------

Dataset = Annotated[
    DatasetName,
    typer.Option("--dataset", "-d", help="Data set (digits is embedded).", rich_help_panel=DATA),
]
DatasetOverride = Annotated[
    DatasetName | None,
    typer.Option(
        "--dataset", "-d", help="Data set (default: the checkpoint's).", rich_help_panel=DATA
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder with the torchvision data sets (default $FLATCLI_DATA or ~/.cache/flatcli/data).",
        rich_help_panel=DATA,
    ),
]
Download = Annotated[
    bool,
    typer.Option(
        "--download",
        metavar=FLAG,
        help="Download a torchvision data set that is missing.",
        rich_help_panel=DATA,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device", help="auto (CUDA when available), cpu or cuda.", rich_help_panel=PROCESSES
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.", rich_help_panel=PROCESSES)]
Json = Annotated[
    bool,
    typer.Option(
        "--json",
        metavar=FLAG,
        help="Short for --format json.",
        rich_help_panel=OUTPUT,
    ),
]
#: ``--format`` unless given (or ``--json``).
DEFAULT_FORMAT = "table"
Format = Annotated[
    FormatName | None,
    typer.Option(
        "--format",
        help=f"Print as {DEFAULT_FORMAT}s (default), GitHub markdown, CSV or one JSON document.",
        rich_help_panel=OUTPUT,
    ),
]

# --- a checkpoint, possibly a model from elsewhere (see flatcli.models.factory) ---------

Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="A checkpoint (.safetensors; with --model-factory also .pt/.pth/.bin or a Lightning .ckpt) or a run directory."
    ),
]
ModelFactory = Annotated[
    str | None,
    typer.Option(
        "--model-factory",
        help="Builds the model of a checkpoint without flatcli metadata (safetensors, .pt/.pth/.bin state dict, Lightning .ckpt): package.module:function (e.g. torchvision.models:resnet18) or file.py:function.",
        rich_help_panel=MODEL,
    ),
]
FactoryArg = Annotated[
    list[str] | None,
    typer.Option(
        "--factory-arg",
        metavar="KEY=VALUE",
        help="KEY=VALUE keyword argument of the model factory (repeatable; VALUE parsed as JSON when it can be, else a string), e.g. num_classes=10.",
        rich_help_panel=MODEL,
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="Which part of the factory model's output is the logits: a dict key, attribute name or tuple index. Default: a tensor as is; else a 'logits' key or attribute; else a dict's only tensor; else a tuple's first element when it is a 2-D tensor.",
        rich_help_panel=MODEL,
    ),
]

# --- what to measure and how: the fields of SharpnessConfig ------------------------------

Measures = Annotated[
    str,
    typer.Option(
        "--measures",
        help=f"Comma-separated, any of: {', '.join(MEASURE_NAMES)}.",
        rich_help_panel=ESTIMATOR,
    ),
]
Split = Annotated[
    SplitName, typer.Option(rich_help_panel=DATA, help="The data the loss is measured on.")
]
Samples = Annotated[
    int | None,
    typer.Option(rich_help_panel=DATA, help="Measure on a deterministic subset of N images."),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=ESTIMATOR,
        help="Images per forward pass (memory; with --bn-mode batch also the statistics). Default: on the CPU as many as keep a batch's activations within 8 MiB (32 to 1024), else 1024; with --bn-mode batch always 1024.",
    ),
]
MemoryGb = Annotated[
    float,
    typer.Option(
        rich_help_panel=ESTIMATOR,
        help="Memory budget for a block of Hessian-vector products (vmap chunk size, keeping gradient graphs).",
    ),
]
Curvature = Annotated[
    CurvatureName,
    typer.Option(
        rich_help_panel=ESTIMATOR, help="The Hessian or the generalised Gauss-Newton matrix (ggn)."
    ),
]
BnMode = Annotated[
    BnModeName,
    typer.Option(
        rich_help_panel=ESTIMATOR,
        help="BatchNorm: eval (running statistics), batch (statistics of each batch of --batch-size, default 1024 whatever the machine or memory: the batch size defines the matrix and is recorded as bn_batch_size; as the paper's authors) or full (statistics of the whole measured set, one batch of all samples).",
    ),
]
IncludeL2 = Annotated[
    bool,
    typer.Option(
        metavar=FLAG,
        rich_help_panel=ESTIMATOR,
        help="Add the checkpoint's coupled L2 coefficient times the identity.",
    ),
]
Exact = Annotated[
    bool,
    typer.Option(
        metavar=FLAG,
        rich_help_panel=ESTIMATOR,
        help="Dense matrix and its eigenvalues (small models only).",
    ),
]
Tol = Annotated[
    float,
    typer.Option(
        rich_help_panel=ESTIMATOR,
        help="Lanczos: stop when the Ritz residual is below tol * |lambda| (0 < tol < 1). A run stopped by --max-iter first is reported as not converged.",
    ),
]
MaxIter = Annotated[int, typer.Option(rich_help_panel=ESTIMATOR, help="Lanczos: most iterations.")]
Probes = Annotated[
    int,
    typer.Option(
        rich_help_panel=ESTIMATOR,
        help="Trace/Frobenius: Hessian-vector products (block Krylov Hutch++; both share them). At least 4; under 13 the standard error rests on fewer than 10 samples and is reported as not converged.",
    ),
]
TargetStderr = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=ESTIMATOR,
        help="Trace/Frobenius: add probes until the relative standard error is at most this (e.g. 0.01; at most 10x --probes in all).",
    ),
]
Dtype = Annotated[
    DtypeName,
    typer.Option(rich_help_panel=ESTIMATOR, help="Floating-point precision of the products."),
]
Rho = Annotated[
    float,
    typer.Option(
        rich_help_panel=ESTIMATOR,
        help="adaptive_sharpness: relative noise scale rho (perturbation |w| * N(0, rho^2)).",
    ),
]
LogitNormalise = Annotated[
    bool,
    typer.Option(
        metavar=FLAG,
        rich_help_panel=ESTIMATOR,
        help="adaptive_sharpness: normalise the logits (scale-invariant for linear models).",
    ),
]
NoCache = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        metavar=FLAG,
        rich_help_panel=PROCESSES,
        help="Recompute even if sharpness.json has the result.",
    ),
]


#: The options that set how a measurement is made, each a field of :class:`SharpnessConfig`
#: (its default is the field's), in the order ``--help`` lists them: declared on a command
#: by :func:`measurement_options`.
MEASUREMENT_OPTIONS: dict[str, object] = {
    "split": Split,
    "samples": Samples,
    "batch_size": BatchSize,
    "memory_gb": MemoryGb,
    "curvature": Curvature,
    "bn_mode": BnMode,
    "include_l2": IncludeL2,
    "exact": Exact,
    "tol": Tol,
    "max_iter": MaxIter,
    "probes": Probes,
    "target_stderr": TargetStderr,
    "rho": Rho,
    "logit_normalise": LogitNormalise,
}


def measurement_options(
    *, without: tuple[str, ...] = ()
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Declare the :data:`MEASUREMENT_OPTIONS` (but those ``without``) on a command, right
    after its ``measures`` parameter, so that each is written once for every command.

    Typer reads a command's options from its signature: the decorated command shows them
    in its signature, and Typer puts their values in ``ctx.params``, where
    :func:`sharpness_config` reads them; the command's own function never receives them.
    """
    unknown = set(without) - set(MEASUREMENT_OPTIONS)
    if unknown:
        raise ValueError(f"no measurement options {sorted(unknown)}")
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=alias,
            default=getattr(SharpnessConfig, name),
        )
        for name, alias in MEASUREMENT_OPTIONS.items()
        if name not in without
    ]

    def declare(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            for parameter in added:
                kwargs.pop(parameter.name, None)
            return command(*args, **kwargs)

        own = list(inspect.signature(command, eval_str=True).parameters.values())
        at = [p.name for p in own].index("measures") + 1
        run.__signature__ = inspect.Signature(own[:at] + added + own[at:])  # type: ignore[attr-defined]
        return run

    return declare


def sharpness_config(ctx: typer.Context, measures: tuple[str, ...]) -> SharpnessConfig:
    """The :class:`SharpnessConfig` of a command: ``measures``, and each option named as a
    field of the config (``--tol`` sets ``tol``); the fields no option sets keep their
    defaults.
    """
    settings = {name: ctx.params[name] for name in _SETTINGS if name in ctx.params}
    return dataclasses.replace(SharpnessConfig(measures=measures), **settings)


#: The fields of :class:`SharpnessConfig` that a command's options may set.
_SETTINGS = tuple(
    f.name for f in dataclasses.fields(SharpnessConfig) if f.init and f.name != "measures"
)


def output_format(format_: str | None, json_: bool) -> str:
    """The format of ``--format`` and ``--json`` (its short form): ``--json`` is ``json``,
    neither is :data:`DEFAULT_FORMAT`; ``--json`` with another ``--format`` is a UsageError.
    """
    if json_ and format_ not in (None, "json"):
        raise UsageError(
            f"--json and --format {format_} contradict each other (--json is --format json)",
            hint="give one of them",
        )
    return "json" if json_ else format_ or DEFAULT_FORMAT


def names(text: str) -> tuple[str, ...]:
    """The names of a comma-separated option (``--measures a,b``), blanks dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def key_values(items: list[str] | None, option: str, example: str) -> dict[str, object]:
    """``KEY=VALUE`` pairs of a repeatable option as keyword arguments: VALUE parsed as JSON
    when it can be (``10`` an int, ``true`` a bool, ``[1, 2]`` a list), else kept as a
    string; dashes in KEY become underscores. A pair without ``=`` or whose KEY is no
    Python name is a UsageError naming ``option``.
    """
    result: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(f"{option} {item!r} is not KEY=VALUE", hint=f"e.g. {option} {example}")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


def factory_args(items: list[str] | None) -> dict[str, object]:
    """The ``--factory-arg KEY=VALUE`` pairs as keyword arguments of the model factory."""
    return key_values(items, "--factory-arg", "num_classes=10")


def checkpoint_source(
    dataset: str | None,
    data_dir: Path | None,
    device: str,
    model_factory: str | None,
    factory_arg: list[str] | None,
    output: str | None,
) -> CheckpointSource:
    """The :class:`~flatcli.workflows.source.CheckpointSource` of ``--dataset``,
    ``--data-dir``, ``--device``, ``--model-factory``, ``--factory-arg`` and ``--output``.
    """
    return CheckpointSource(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        device=device,
        model_factory=model_factory,
        factory_args=factory_args(factory_arg),
        output=output,
    )
