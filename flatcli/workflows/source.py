"""Where a checkpoint's model and data come from, declared once for every workflow.

:func:`~flatcli.workflows.sharpness.load_point`,
:func:`~flatcli.workflows.rank.rank_checkpoint` and
:func:`~flatcli.workflows.compare.compare_checkpoints` take a :class:`CheckpointSource`;
the command line builds one from its options
(:func:`flatcli.cli.options.checkpoint_source`). This module imports no torch, so that
the command line can build a source before it pays for torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch: only the type is needed here
    from flatcli.models.factory import ModelFactory

__all__ = ["DEFAULT_SOURCE", "CheckpointSource"]


@dataclass(frozen=True)
class CheckpointSource:
    """How a checkpoint is loaded and which data it is measured on.

    ``dataset``: the data set measured on (default: the one the checkpoint records);
    ``data_dir``: the folder of the torchvision data sets (default ``$FLATCLI_DATA`` or
    ``~/.cache/flatcli/data``); ``device``: ``auto``, ``cpu`` or ``cuda``. A checkpoint
    without flatcli metadata is built by ``model_factory`` (a ``package.module:function``
    or ``file.py:function`` spec, or any callable) called with ``factory_args``, and
    ``output`` names the logits in what its forward returns
    (:func:`~flatcli.workflows.checkpoint.load_checkpoint`,
    :func:`~flatcli.models.factory.pick_logits`).
    """

    dataset: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    model_factory: ModelFactory | None = None
    factory_args: Mapping[str, object] | None = None
    output: str | int | None = None


#: A flatcli checkpoint measured on the data set it records, from the default folder,
#: on the default device.
DEFAULT_SOURCE = CheckpointSource()
