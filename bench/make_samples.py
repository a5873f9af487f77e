"""Regenerate ``sample_checkpoints/``: small digits models, each from one ``flatcli train`` command.

    python bench/make_samples.py

Each sample is the ``model.safetensors`` of a run, copied to
``sample_checkpoints/NAME.safetensors``; ``sample_checkpoints/README.md`` lists the exact
command behind each file. Training is deterministic on the CPU, so rerunning this
script reproduces the files bit for bit with the same torch version.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sample_checkpoints"

#: name -> (what it shows, flatcli train options)
SAMPLES: dict[str, tuple[str, str]] = {
    "logreg-sgd": (
        "logistic regression, plain SGD",
        "--model logreg --optimizer sgd --lr 0.1 --epochs 60",
    ),
    "logreg-sgd-l2": (
        "logistic regression, SGD with coupled L2 5e-3",
        "--model logreg --optimizer sgd --lr 0.1 --epochs 60 --l2 5e-3",
    ),
    "mlp-sgd": (
        "MLP 64-64-10 (ReLU), plain SGD",
        "--model mlp --width 64 --optimizer sgd --lr 0.05 --epochs 60",
    ),
    "mlp-sgd-l2": (
        "MLP 64-64-10, SGD with coupled L2 5e-3",
        "--model mlp --width 64 --optimizer sgd --lr 0.05 --epochs 60 --l2 5e-3",
    ),
    "mlp-gadam": (
        "MLP 64-64-10, Gadam: AdamW, decoupled weight decay 0.25, averaging from epoch 33",
        "--model mlp --width 64 --recipe gadam --lr 0.01 --epochs 60",
    ),
}


def main() -> None:
    argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0].rstrip(".") + "; overwrites them in place."
    ).parse_args()
    OUT.mkdir(exist_ok=True)
    lines = [
        "# Sample checkpoints",
        "",
        "Small models trained on the embedded `digits` data (scikit-learn's 8x8 digits), each by the",
        "command shown (CPU, seed 0). Regenerate all with `python bench/make_samples.py`.",
        "",
        "    flatcli sharpness sample_checkpoints/mlp-sgd.safetensors",
        "",
        "| file | model | command |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (what, options) in SAMPLES.items():
            command = f"flatcli train {options} --seed 0 --device cpu"
            run = Path(tmp) / name
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "flatcli",
                    "train",
                    *shlex.split(options),
                    "--seed",
                    "0",
                    "--device",
                    "cpu",
                    "--out",
                    str(run),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            shutil.copyfile(run / "model.safetensors", OUT / f"{name}.safetensors")
            size = (OUT / f"{name}.safetensors").stat().st_size
            lines.append(
                f"| `{name}.safetensors` ({size / 1024:.0f} KiB) | {what} | `{command} --out DIR` |"
            )
            print(f"{name}: {size} bytes")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
