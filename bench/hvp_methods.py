"""Time one gradient against Hessian-vector products by each method, and print ratios.

Problem: the MLP 784-64-10 (ReLU, 50,890 parameters) of docs/paper.md, 4,000 inputs in
one batch; random inputs and labels by default, real MNIST digits with --data-dir (a
torchvision MNIST root, e.g. ../shared/data/mnist5k). Quantities, each the median of
--repeats runs after one warm-up:

* gradient of the mean loss (one data pass);
* one HVP by double backward and by forward-over-reverse;
* a block of K (default 16) HVPs by each method (one vmapped data pass).

The ratios to the gradient choose ``AUTO_METHOD`` in flatcli/curvature/operator.py.

    python bench/hvp_methods.py [--device cpu|cuda] [--data-dir DIR] [--k 16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from flatcli.curvature.operator import CurvatureOperator


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _data(data_dir: str | None, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir is None:
        return torch.randn(n, 784, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    import torchvision  # only needed for real data

    mnist = torchvision.datasets.MNIST(root=data_dir, train=True, download=False)
    x = mnist.data[:n].reshape(-1, 784).float() / 255.0
    return (x - 0.1307) / 0.3081, mnist.targets[:n].clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="torchvision MNIST root (download=False)")
    parser.add_argument("--n", type=int, default=4000, help="number of inputs")
    parser.add_argument("--k", type=int, default=16, help="vectors in a block")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    x, y = _data(args.data_dir, args.n, gen)
    x, y = x.to(device), y.to(device)

    ops = {
        m: CurvatureOperator(model, x, y, method=m)
        for m in ("double_backward", "forward_over_reverse")
    }
    p = ops["double_backward"].num_params
    v = torch.randn(p, generator=gen).to(device)
    block = torch.randn(p, args.k, generator=gen).to(device)

    rows: list[tuple[str, float]] = [
        ("gradient", _median_time(ops["double_backward"].gradient, device, args.repeats))
    ]
    for name, op in ops.items():
        rows.append((f"1 HVP, {name}", _median_time(lambda op=op: op.matvec(v), device, args.repeats)))
    for name, op in ops.items():
        rows.append(
            (f"{args.k} HVPs (block), {name}", _median_time(lambda op=op: op.matmat(block), device, args.repeats))
        )

    data = "MNIST " + args.data_dir if args.data_dir else "random data"
    print(f"MLP 784-64-10 ({p:,} parameters), {args.n} inputs ({data}), one batch, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    grad_time = rows[0][1]
    single = {name: t for name, t in rows[1:3]}
    print(f"{'quantity':<44}{'time (ms)':>10}{'/ gradient':>12}{'/ 1 HVP':>10}")
    for name, t in rows:
        per_single = ""
        for method, t1 in single.items():
            if name.endswith(method) and "block" in name:
                per_single = f"{t / t1:10.2f}"
        print(f"{name:<44}{1e3 * t:10.1f}{t / grad_time:12.2f}{per_single}")
    blocks = {n.rsplit(", ", 1)[1]: t for n, t in rows[3:]}
    best = min(blocks, key=blocks.__getitem__)
    print(f"fastest block of {args.k} on {device.type}: {best}")


if __name__ == "__main__":
    main()
