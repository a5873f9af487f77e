"""Options shared by several commands, declared once as ``Annotated`` aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Dataset = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="Data set: digits (embedded), mnist, fashion-mnist, cifar10, cifar100.",
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder with the torchvision data sets (default $FLATCLI_DATA or ~/.cache/flatcli/data).",
    ),
]
Download = Annotated[
    bool, typer.Option("--download", help="Download a torchvision data set that is missing.")
]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")
]

# A model from elsewhere (sharpness, rank-bound, compare): see flatcli.models.factory.
ModelFactory = Annotated[
    str | None,
    typer.Option(
        "--model-factory",
        help="Builds the model of a checkpoint without flatcli metadata (safetensors, .pt/.pth/.bin state dict, Lightning .ckpt): package.module:function (e.g. torchvision.models:resnet18) or file.py:function.",
    ),
]
FactoryArg = Annotated[
    list[str] | None,
    typer.Option(
        "--factory-arg",
        help="KEY=VALUE keyword argument of the model factory (repeatable; VALUE parsed as JSON when it can be, else a string), e.g. num_classes=10.",
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="Which part of the factory model's output is the logits: a dict key, attribute name or tuple index. Default: a tensor as is; else a 'logits' key or attribute; else a dict's only tensor; else a tuple's first element when it is a 2-D tensor.",
    ),
]


def factory_args(items: list[str] | None) -> dict:
    """``--factory-arg KEY=VALUE`` pairs as keyword arguments: VALUE parsed as JSON when it
    can be (``10`` an int, ``true`` a bool, ``[1, 2]`` a list), else kept as a string.
    """
    import json

    from flatcli.errors import UsageError

    result = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(
                f"--factory-arg {item!r} is not KEY=VALUE", hint="e.g. --factory-arg num_classes=10"
            )
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result
