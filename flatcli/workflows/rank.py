"""``flatcli rank-bound`` from a checkpoint: load it with its data, then bound and measure.

The bound and the ranks are pure functions of the model and the data
(:func:`flatcli.analysis.rank.rank_report`); this module only loads them.
"""

from __future__ import annotations

import os

from flatcli.analysis.progress import ProgressCallback
from flatcli.analysis.rank import RankReport, check_rank_options, rank_report
from flatcli.config import RANK_FRACTION, RANK_SEED
from flatcli.workflows.data import get_spec
from flatcli.workflows.sharpness import load_point
from flatcli.workflows.source import DEFAULT_SOURCE, CheckpointSource

__all__ = ["rank_checkpoint"]


def rank_checkpoint(
    path: str | os.PathLike[str],
    source: CheckpointSource = DEFAULT_SOURCE,
    *,
    samples: int | None = None,
    exact: bool | None = None,
    threshold: float | None = None,
    fraction: float = RANK_FRACTION,
    seed: int = RANK_SEED,
    progress: ProgressCallback | None = None,
) -> RankReport:
    """The rank report of a checkpoint on (the first ``samples`` of) its training data.

    The options are checked (:func:`~flatcli.analysis.rank.check_rank_options`) before
    the checkpoint is loaded; the checkpoint and its data as ``source`` says, by
    :func:`~flatcli.workflows.sharpness.load_point` (``source.dataset`` measures it on
    another data set of the same shape). The number of classes is the checkpoint's, or the data
    set's when the checkpoint does not record it. ``exact``, ``threshold``, ``fraction``,
    ``seed`` and ``progress`` as in :func:`~flatcli.analysis.rank.rank_report`.
    """
    check_rank_options(threshold=threshold, fraction=fraction)
    point = load_point(path, source, samples=samples)
    recorded = (
        point.info.dataset.get("num_classes") if isinstance(point.info.dataset, dict) else None
    )
    num_classes = int(recorded or get_spec(point.dataset).num_classes)
    return rank_report(
        point.model,
        point.inputs,
        point.targets,
        num_classes,
        exact=exact,
        threshold=threshold,
        fraction=fraction,
        seed=seed,
        progress=progress,
    )
