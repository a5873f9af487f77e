"""The paper's published numbers, as data: what ``flatcli demo --protocol paper`` prints
beside its own.

Granziol (2020, "Flatness is a False Friend", arXiv 2006.09091) publishes the spectra of
PreResNet-110 trained on CIFAR-100 for 300 epochs with six recipes, and quotes ratios of
their largest eigenvalues; ``docs/paper.md`` ("Published spectra: PreResNet-110 on
CIFAR-100, epoch 300") copies them. Each entry here names the arm of the protocol it
belongs to (``flatcli.workflows.protocol.ARMS``: ``sgd``, ``sgd-l2``, ``adam``, ``adamw``,
``gadam``, ``swa``) and its source. Nothing here is computed from a run: these are the
numbers to compare against, and a ratio is quoted as the paper quotes it (8x, not
30.4 / 3.77 = 8.06x).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "PUBLISHED",
    "RATIOS",
    "PublishedRatio",
    "PublishedRun",
    "PublishedTable",
    "published_ratio",
    "published_run",
]

#: Where the numbers are copied from.
SOURCE = "docs/paper.md, 'Published spectra: PreResNet-110 on CIFAR-100, epoch 300'"


@dataclass(frozen=True)
class PublishedRun:
    """One published row: the recipe as the paper names it and its measured numbers.

    ``trace_per_param`` is Tr(H) / P; ``weight_norm`` is ||w|| (None where the paper gives
    none, as for the averaged runs).
    """

    label: str
    lambda_max: float
    trace_per_param: float
    weight_norm: float | None = None


@dataclass(frozen=True)
class PublishedTable:
    """The published numbers of one protocol model on one data set, by arm."""

    model: str
    dataset: str
    epochs: int
    runs: dict[str, PublishedRun]
    source: str = SOURCE


#: The published tables (one so far: PreResNet-110 on CIFAR-100).
PUBLISHED: tuple[PublishedTable, ...] = (
    PublishedTable(
        model="preresnet",
        dataset="cifar100",
        epochs=300,
        runs={
            "sgd-l2": PublishedRun("SGD, wd 5e-4", 30.4, 3.6e-3, 45.5),
            "sgd": PublishedRun("SGD, no wd", 3.77, 8.5e-5, 307.0),
            "swa": PublishedRun("SGD + averaging", 8.78, 5.4e-4),
            "adamw": PublishedRun("AdamW, wd 0.25", 1295.0, 5.2e-2, 35.7),
            "adam": PublishedRun("Adam, no wd", 78.2, 4.9e-4, 333.0),
            "gadam": PublishedRun("Gadam (AdamW + averaging)", 459.0, 1.2e-2),
        },
    ),
)


@dataclass(frozen=True)
class PublishedRatio:
    """A ratio of two arms' lambda_max that the paper quotes: ``numerator / denominator``.

    ``models`` are the protocol models the quote is about (its value is shown for those
    only); ``source`` says where it is quoted.
    """

    name: str
    numerator: str
    denominator: str
    quoted: float
    models: tuple[str, ...]
    dataset: str
    source: str


#: The ratios the paper quotes (docs/paper.md).
RATIOS: tuple[PublishedRatio, ...] = (
    PublishedRatio(
        "weight decay raises lambda_max (SGD)",
        "sgd-l2",
        "sgd",
        8.0,
        ("preresnet",),
        "cifar100",
        SOURCE,
    ),
    PublishedRatio(
        "weight decay raises lambda_max (Adam)",
        "adamw",
        "adam",
        16.6,
        ("preresnet",),
        "cifar100",
        SOURCE,
    ),
    PublishedRatio(
        "Gadam vs SGD + averaging", "gadam", "swa", 52.0, ("preresnet",), "cifar100", SOURCE
    ),
    PublishedRatio(
        "Gadam vs SGD",
        "gadam",
        "sgd",
        30.0,
        ("vgg16", "vgg16-bn"),
        "cifar100",
        "docs/paper.md, 'The claims', 3 (roughly 30 times sharper, VGG-16 / CIFAR-100)",
    ),
)


def published_run(dataset: str, model: str, arm: str) -> PublishedRun | None:
    """The paper's row for ``model``'s run ``arm`` on ``dataset``; None where it has none."""
    for table in PUBLISHED:
        if table.dataset == dataset and table.model == model:
            return table.runs.get(arm)
    return None


def published_ratio(ratio: PublishedRatio, dataset: str, model: str) -> float | None:
    """The value the paper quotes for ``ratio`` on ``model`` and ``dataset``; None otherwise."""
    return ratio.quoted if dataset == ratio.dataset and model in ratio.models else None
