"""Options shared by several commands, declared once as ``Annotated`` aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Dataset = Annotated[str, typer.Option("--dataset", "-d", help="Data set: digits (embedded), mnist, fashion-mnist, cifar10, cifar100.")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder with the torchvision data sets (default $FLATCLI_DATA or ~/.cache/flatcli/data).")]
Download = Annotated[bool, typer.Option("--download", help="Download a torchvision data set that is missing.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
