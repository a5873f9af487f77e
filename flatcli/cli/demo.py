"""``flatcli demo``: the paper's contrasts on the embedded digits data, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli import options as opt
from flatcli.cli._common import err, handle_errors, out, print_json


@handle_errors
def demo(
    dataset: opt.Dataset = "digits",
    data_dir: opt.DataDir = None,
    models: Annotated[
        str, typer.Option(help="Comma-separated models (logreg, mlp, cnn, ...).")
    ] = "logreg,mlp,cnn",
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 60,
    train_samples: Annotated[
        int | None, typer.Option(help="Train on a deterministic subset.")
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="Measure curvature on a deterministic subset.")
    ] = None,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for the demo's runs (reused when the settings match)."
        ),
    ] = Path("runs/demo"),
    overwrite: Annotated[
        bool, typer.Option(help="Retrain runs that exist with other settings.")
    ] = False,
    seed: opt.Seed = 0,
    device: opt.Device = "auto",
    json_: opt.Json = False,
) -> None:
    """Train the paper's contrasts (with/without L2; SGD vs Gadam) for each model, compare their sharpness
    and generalisation, check the rank bound, sweep the weight scale, and say which claims held.
    """
    import os

    if (
        int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    ):  # N copies would train into the same folders
        from flatcli.errors import UsageError

        raise UsageError(
            "flatcli demo runs in one process, not under torchrun",
            hint="run train, sharpness, rank-bound and compare under torchrun instead",
        )
    from flatcli.report.tables import demo_report
    from flatcli.workflows.demo import DemoConfig, demo_as_dict, run_demo

    config = DemoConfig(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        epochs=epochs,
        train_samples=train_samples,
        measure_samples=samples,
        out=out_dir / dataset if out_dir == Path("runs/demo") else out_dir,
        seed=seed,
        device=device,
        overwrite=overwrite,
    )
    result = run_demo(
        config, on_step=lambda message: err.print(f"[dim]{message}...[/]", highlight=False)
    )
    if json_:
        print_json(demo_as_dict(result))
        return
    demo_report(out, result)
