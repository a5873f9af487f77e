"""The paper's scale: VGG-16 and PreResNet-110 on 50,000 CIFAR-shaped inputs, timed.

What ``flatcli demo --protocol paper`` costs per model on the device at hand, from the
parts that dominate it, on random weights and random inputs of CIFAR's shape (3 x 32 x 32,
100 classes; no download is possible on the benchmark machines, and random tensors of the
right shape serve for timing):

* ``epoch s``: one training epoch (flatcli's ``train_one_epoch``: SGD with momentum, batch
  128, random crops and flips), over ``--n`` inputs;
* ``HVP s``: one Hessian-vector product over all ``--n`` inputs by flatcli's operator
  (double backward, batches of ``--hvp-batch``), in BatchNorm batch mode (the protocol's)
  and in eval mode (PyHessian's, for the comparison);
* ``lambda_max s``: flatcli's Lanczos for ``--steps`` steps (tol 1e-12, so every step is
  run) in eval mode; ``HVPs`` counts its products, the float64 re-check of its bound
  included (one product in float64, several float32 ones' worth on a CPU);
* PyHessian on the same model and data in eval mode (it forces it): one
  ``dataloader_hv_product`` and ``eigenvalues(maxIter=--steps, tol=0)`` (power iteration,
  exactly ``--steps`` products), and the ratios flatcli / PyHessian;
* ``peak GiB``: ``torch.cuda.max_memory_allocated`` of each phase (CUDA only).

    python bench/paper_scale.py --device cuda                 # n = 50,000 (bench/gpu_check.sh)
    python bench/paper_scale.py --n 256 --device cpu --steps 3

Each timing is one run after one untimed warm-up product (the epoch: one untimed batch).
One torch thread on the CPU unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatcli.config import make_train_config
from flatcli.curvature import CurvatureOperator, lambda_max
from flatcli.curvature.results import Estimate
from flatcli.distributed import resolve_device
from flatcli.models import build_model
from flatcli.workflows.training import OPTIMIZERS, train_one_epoch

#: The protocol's models at full size (flatcli.workflows.protocol.PROTOCOL_MODELS).
MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "vgg16": ("vgg16", {"batchnorm": True}),
    "preresnet": ("preresnet", {"depth": 110}),
}
SHAPE = (3, 32, 32)


@dataclass
class Row:
    """One model's figures (None: not measured)."""

    model: str
    params: int
    epoch_s: float
    hvp_batch_s: float
    hvp_eval_s: float
    lambda_max_s: float
    lanczos_hvps: int
    ph_hvp_s: float | None = None
    ph_lambda_max_s: float | None = None
    peak_gib: float | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warm: bool = True) -> float:
    """Seconds of one call of ``fn`` (after one untimed call if ``warm``)."""
    if warm:
        fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak(device: torch.device) -> float | None:
    """Peak GiB allocated since the last reset (CUDA), None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def pyhessian() -> ModuleType | None:
    try:
        return importlib.import_module("pyhessian.hessian")
    except ImportError:
        print("  PyHessian is not installed (pip install pyhessian): its columns are empty")
        return None


def measure(
    name: str, args: argparse.Namespace, device: torch.device, ph: ModuleType | None
) -> Row:
    zoo, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = build_model(zoo, input_shape=SHAPE, num_classes=args.classes, **kwargs).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, *SHAPE, generator=gen)
    y = torch.randint(0, args.classes, (args.n,), generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    xd, yd = x.to(device), y.to(device)

    # one training epoch, as flatcli trains (a copy: the weights measured stay random)
    trained = copy.deepcopy(model)
    tc = make_train_config("paper-sgd", model=zoo, epochs=1, batch_size=args.batch)
    optimizer = OPTIMIZERS[tc.optimizer](list(trained.parameters()), tc)
    train_one_epoch(trained, optimizer, xd[: args.batch], yd[: args.batch], tc, gen, True)
    epoch_s = timed(
        lambda: train_one_epoch(trained, optimizer, xd, yd, tc, gen, True), device, warm=False
    )

    ops = {
        mode: CurvatureOperator(
            model, x, y, bn_mode=mode, batch_size=args.hvp_batch, cache_graph=False
        )
        for mode in ("batch", "eval")
    }
    v = torch.randn(ops["eval"].num_params, 1, generator=gen).to(device)
    hvp_batch_s = timed(lambda: ops["batch"].matmat(v), device)
    hvp_eval_s = timed(lambda: ops["eval"].matmat(v), device)
    found: list[Estimate] = []
    lam_s = timed(
        lambda: found.append(lambda_max(ops["eval"], tol=1e-12, max_iter=args.steps, seed=0)),
        device,
        warm=False,
    )
    row = Row(name, ops["eval"].num_params, epoch_s, hvp_batch_s, hvp_eval_s, lam_s, found[0].hvps)
    if ph is not None:
        loader = DataLoader(TensorDataset(x, y), batch_size=args.hvp_batch)
        h = ph.hessian(model, nn.CrossEntropyLoss(), dataloader=loader, cuda=device.type == "cuda")
        w = [torch.randn(p.shape, generator=gen).to(device) for p in h.params]
        row.ph_hvp_s = timed(lambda: h.dataloader_hv_product(w), device)
        torch.manual_seed(0)
        row.ph_lambda_max_s = timed(
            lambda: h.eigenvalues(maxIter=args.steps, tol=0.0), device, warm=False
        )
        model.zero_grad(set_to_none=True)  # PyHessian leaves graphs in .grad
    row.peak_gib = peak(device)
    return row


def fmt(value: float | int | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def print_rows(rows: Sequence[Row], args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"\n  paper scale on {device}: n = {args.n} inputs 3x32x32, {args.classes} classes, "
        f"train batch {args.batch}, HVP batch {args.hvp_batch}, {args.steps} Lanczos / power steps"
    )
    header = [
        "model",
        "params",
        "epoch s",
        "HVP s (BN batch)",
        "HVP s (eval)",
        "lambda_max s",
        "HVPs",
        "PyH HVP s",
        "PyH lambda_max s",
        "HVP ratio",
        "lambda_max ratio",
        "peak GiB",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r.model,
                f"{r.params:,}",
                fmt(r.epoch_s),
                fmt(r.hvp_batch_s),
                fmt(r.hvp_eval_s),
                fmt(r.lambda_max_s),
                str(r.lanczos_hvps),
                fmt(r.ph_hvp_s),
                fmt(r.ph_lambda_max_s),
                fmt(r.hvp_eval_s / r.ph_hvp_s if r.ph_hvp_s else None, ".2f"),
                fmt(r.lambda_max_s / r.ph_lambda_max_s if r.ph_lambda_max_s else None, ".2f"),
                fmt(r.peak_gib),
            ]
        )
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    for line in (header, *table):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    print("  ratios: flatcli / PyHessian seconds (eval mode, the same products)")
    per_epoch = {r.model: r.epoch_s for r in rows}
    print(
        "  300 epochs: "
        + ", ".join(f"{m} {300 * s / 3600:.2g} h" for m, s in per_epoch.items())
        + f" (at n = {args.n})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated: vgg16, preresnet"
    )
    parser.add_argument("--n", type=int, default=50_000, help="random inputs (default 50,000)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128, help="training batch")
    parser.add_argument("--hvp-batch", type=int, default=1024, help="samples per forward of an HVP")
    parser.add_argument("--steps", type=int, default=20, help="Lanczos and power iteration steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--no-pyhessian", action="store_true", help="skip PyHessian")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.hvp_batch = min(args.hvp_batch, args.n)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names or args.n < 1 or args.steps < 2:
        parser.error(f"models from {', '.join(MODELS)}; --n >= 1; --steps >= 2 (got {args})")
    ph = None if args.no_pyhessian else pyhessian()
    rows = [measure(name, args, device, ph) for name in names]
    print_rows(rows, args, device)
    if device.type == "cuda" and not math.isnan(sum(r.epoch_s for r in rows)):
        print(f"  {torch.cuda.get_device_name(device)}")


if __name__ == "__main__":
    main()
