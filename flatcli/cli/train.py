"""``flatcli train``: train a model and save a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, SupportsFloat

import typer

from flatcli.analysis.progress import Tick
from flatcli.cli import options as opt
from flatcli.cli._common import emit, err, handle_errors, is_main, join_world, out
from flatcli.cli.choices import DatasetName, ModelName, OptimizerName, RecipeName, ScheduleName
from flatcli.cli.progress import INFO_INTERVAL_S, ProgressDisplay, duration
from flatcli.config import DEFAULT_LR, TrainConfig, make_train_config, resume_config
from flatcli.errors import FlatcliError

if TYPE_CHECKING:
    from flatcli.workflows.training import TrainResult

#: The field defaults shown in the help: options left out are None (not given), so that
#: ``--resume`` can tell them from the run's own values.
_DEFAULT = TrainConfig()


#: The example in ``flatcli train --help``.
EXAMPLE = (
    "Example: flatcli train --model mlp --width 64 --optimizer adamw --epochs 20 --out runs/mlp"
)


@handle_errors
def train_command(
    dataset: Annotated[
        DatasetName | None,
        typer.Option(
            "--dataset",
            "-d",
            rich_help_panel=opt.DATA,
            help=f"Data set; digits is embedded (default {_DEFAULT.dataset}).",
        ),
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            metavar=opt.FLAG,
            rich_help_panel=opt.DATA,
            help="Random crop + flip (default on for CIFAR only).",
        ),
    ] = None,
    train_samples: Annotated[
        int | None,
        typer.Option(rich_help_panel=opt.DATA, help="Train on a deterministic subset of N images."),
    ] = None,
    data_dir: opt.DataDir = None,
    download: opt.Download = False,
    model: Annotated[
        ModelName | None,
        typer.Option(
            "--model",
            "-m",
            rich_help_panel=opt.MODEL,
            help=f"Model architecture (default {_DEFAULT.model}).",
        ),
    ] = None,
    width: Annotated[
        int | None, typer.Option(rich_help_panel=opt.MODEL, help="mlp: hidden units per layer.")
    ] = None,
    depth: Annotated[
        int | None,
        typer.Option(rich_help_panel=opt.MODEL, help="mlp: hidden layers; preresnet/wrn: depth."),
    ] = None,
    widen: Annotated[
        int | None, typer.Option(rich_help_panel=opt.MODEL, help="wrn: widening factor.")
    ] = None,
    batchnorm: Annotated[
        bool | None,
        typer.Option(
            "--batchnorm/--no-batchnorm",
            metavar=opt.FLAG,
            rich_help_panel=opt.MODEL,
            help="vgg16/cnn: BatchNorm layers.",
        ),
    ] = None,
    model_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--model-arg",
            metavar="KEY=VALUE",
            rich_help_panel=opt.MODEL,
            help="Other model keyword, KEY=VALUE (repeatable).",
        ),
    ] = None,
    optimizer: Annotated[
        OptimizerName | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help=f"Optimiser (default {_DEFAULT.optimizer}).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help="Learning rate (default: "
            + ", ".join(f"{lr:g} for {name}" for name, lr in DEFAULT_LR.items())
            + ").",
        ),
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER, help=f"SGD momentum (default {_DEFAULT.momentum:g})."
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(rich_help_panel=opt.OPTIMISER, help=f"Epochs (default {_DEFAULT.epochs})."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help=f"Mini-batch size (default {_DEFAULT.batch_size}); under torchrun the global batch, split over the processes.",
        ),
    ] = None,
    l2: Annotated[
        float | None,
        typer.Option(rich_help_panel=opt.OPTIMISER, help="Coupled L2: adds X*w to the gradient."),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help="Decoupled weight decay: w <- w(1 - lr X) (as AdamW).",
        ),
    ] = None,
    schedule: Annotated[
        ScheduleName | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help="Learning-rate schedule; paper holds to 50%, then decays linearly to --lr-final at 90%.",
        ),
    ] = None,
    lr_final: Annotated[
        float | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help="Final learning rate of cosine/paper (default lr/100).",
        ),
    ] = None,
    average_from: Annotated[
        int | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help="Average iterates from this epoch on (one snapshot per epoch).",
        ),
    ] = None,
    recipe: Annotated[
        RecipeName | None,
        typer.Option(
            rich_help_panel=opt.OPTIMISER,
            help="A named recipe, explicit options win: gadam is AdamW + decoupled wd + averaging, swa SGD + averaging; paper-* are the paper's CIFAR settings (README: Reproducing the paper).",
        ),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            metavar=opt.FLAG,
            rich_help_panel=opt.PROCESSES,
            help="Under torchrun on GPUs: BatchNorm over the global batch (SyncBatchNorm) instead of each process's part.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", rich_help_panel=opt.PROCESSES, help=f"Random seed (default {_DEFAULT.seed})."
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            rich_help_panel=opt.PROCESSES,
            help=f"{_DEFAULT.device} (default: CUDA when available), cpu or cuda.",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            rich_help_panel=opt.OUTPUT,
            help="Run directory (default runs/DATASET-MODEL-OPTIMIZER-sSEED).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            metavar=opt.FLAG, rich_help_panel=opt.OUTPUT, help="Replace an existing run in --out."
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            metavar=opt.FLAG,
            rich_help_panel=opt.OUTPUT,
            help="Continue an interrupted run in --out with its own options (--epochs may change).",
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            rich_help_panel=opt.OUTPUT,
            help="After training, draw its curves (loss, accuracy, learning rate per epoch) to "
            "this image, e.g. curves.png (needs matplotlib).",
        ),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            rich_help_panel=opt.OUTPUT,
            metavar="DIR",
            help="After training, write its curves as TensorBoard events to DIR/RUN (see them "
            "with tensorboard --logdir DIR; needs the extra flatcli\\[tensorboard]).",
        ),
    ] = None,
    format_: opt.Format = None,
    json_: opt.Json = False,
) -> None:
    """Train a classifier and save DIR/model.safetensors (safetensors + JSON metadata)."""
    fmt = opt.output_format(format_, json_)
    model_kwargs = opt.key_values(model_arg, "--model-arg", "width=64")
    for key, value in (
        ("width", width),
        ("depth", depth),
        ("widen", widen),
        ("batchnorm", batchnorm),
    ):
        if value is not None:
            model_kwargs[key] = value
    # Options left at None were not given: defaults for a new run, the run's own for --resume.
    given = dict(
        dataset=dataset,
        model=model,
        model_kwargs=model_kwargs or None,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        epochs=epochs,
        batch_size=batch_size,
        l2=l2,
        weight_decay=weight_decay,
        schedule=schedule,
        lr_final=lr_final,
        average_from=average_from,
        augment=augment,
        sync_bn=sync_bn,
        train_samples=train_samples,
        seed=seed,
        data_dir=str(data_dir) if data_dir else None,
        download=download,
        device=device,
        out=out_dir,
    )
    if not resume:
        config = make_train_config(recipe, **given, overwrite=overwrite)
    else:
        from flatcli.distributed import main_decides  # torch
        from flatcli.workflows.run_folder import default_run_dir, read_run_options

        TrainConfig(overwrite=overwrite, resume=True)  # refuses the two together
        run_dir = (
            out_dir
            if out_dir is not None
            else default_run_dir(make_train_config(recipe, **given, resume=True))
        )
        join_world(device or "auto")  # under torchrun, rank 0 alone reads the run folder
        config = resume_config(
            main_decides(lambda: read_run_options(run_dir)), recipe, **{**given, "out": run_dir}
        )
    if tensorboard is not None:  # before training: a missing package or a foreign folder
        from flatcli.workflows.tensorboard import check_log_dir  # torch

        check_log_dir(tensorboard, config.out.name if config.out is not None else None)
    if plot is not None:  # before training: a figure that cannot be written is said now
        from flatcli.report import plots  # torch

        plots.check_plot_path(plot)

    from flatcli.report.tables import metrics_table  # torch, as the workflow
    from flatcli.report.text import train_as_dict
    from flatcli.workflows.provenance import provenance
    from flatcli.workflows.training import EpochRecord, TrainCallbacks, train

    # an epochs bar and a batches bar (transient), one line per finished epoch (kept)
    with ProgressDisplay() as display:
        sizes = {"epochs": config.epochs, "batches": 0}
        loss_read = [-INFO_INTERVAL_S]  # when the loss was last read (a device sync)

        def on_start(start: int, total: int, batches: int) -> None:
            sizes.update(epochs=total, batches=batches)
            if start:
                display.say(
                    f"resuming {config.out} at epoch {start + 1}/{total} "
                    f"(epochs 1-{start} were trained before)"
                )
            display(Tick("training", start, total, unit="epochs", finished=start >= total))

        def on_batch(epoch: int, batch: int, loss: SupportsFloat) -> None:
            display(Tick(f"epoch {epoch}", batch + 1, sizes["batches"], unit="batches"))
            if display.clock() - loss_read[0] >= INFO_INTERVAL_S:
                loss_read[0] = display.clock()
                display.info(f"epoch {epoch}", f"loss {float(loss):.4f}")

        def on_epoch(r: EpochRecord) -> None:
            total = sizes["epochs"]
            display.drop(f"epoch {r.epoch}")
            display.say(
                f"epoch {r.epoch}/{total}  train {r.train_loss:.4f} / {r.train_accuracy:.1%}  "
                f"test {r.test_loss:.4f} / {r.test_accuracy:.1%}  lr {r.lr:.3g}  "
                f"{duration(r.seconds)}"
            )
            display(Tick("training", r.epoch, total, unit="epochs", finished=r.epoch >= total))

        result = train(config, TrainCallbacks(on_start, on_batch, on_epoch))

    if tensorboard is not None and is_main():  # under torchrun rank 0 alone writes files
        from flatcli.workflows.tensorboard import write_tensorboard

        where = write_tensorboard(tensorboard, result.run_dir.name, result.history)
        err.print(f"tensorboard events: {where}", highlight=False, markup=False)
    if plot is not None and is_main():  # under torchrun rank 0 alone writes files
        _draw_curves(result, config, plot)
    metrics = {
        **result.metrics,
        "checkpoint": str(result.checkpoint),
        "run_dir": str(result.run_dir),
    }
    emit(
        out,
        fmt,
        lambda console: console.print(
            metrics_table(f"{config.model} on {config.dataset}", metrics)
        ),
        lambda: train_as_dict(result, provenance(config.device)),
    )


def _draw_curves(result: TrainResult, config: TrainConfig, path: Path) -> None:
    """Draw the run's training curves to ``path`` and say where on stderr; the run is saved
    already, so a figure that cannot be written is one error that says so.
    """
    from flatcli.report import plots  # torch, imported already
    from flatcli.workflows.training import RunHistory

    history = RunHistory(result.run_dir.name, result.history, config.recorded())
    try:
        plots.save_figure(plots.curves_figure([history]), path)
    except (OSError, ValueError) as exc:
        raise FlatcliError(
            f"could not write {path} ({getattr(exc, 'strerror', None) or exc}); "
            f"the run is saved in {result.run_dir}"
        ) from None
    err.print(f"training curves: {path}", highlight=False, markup=False)
