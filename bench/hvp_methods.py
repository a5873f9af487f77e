"""Time one gradient against Hessian-vector products by each method, and print ratios.

Problem: the MLP 784-64-10 (ReLU, 50,890 parameters) of Granziol (2020), 4,000 inputs in
one batch; random inputs and labels by default, real MNIST digits with --data-dir (a
torchvision MNIST root, e.g. ../shared/data/mnist5k). Quantities, each the median of
--repeats runs after one warm-up:

* gradient of the mean loss (one data pass);
* one HVP by double backward (standalone, and with the gradient graph kept between
  products) and by forward-over-reverse;
* a block of K (default 16) HVPs by each, in one data pass, for each ``--chunks`` size
  (vectors per vmapped call; 1 is a loop over the vectors).

The ratios to the gradient choose ``AUTO_METHOD`` in flatcli/curvature/operator.py, and
the chunk rows the chunk ``memory_bounded`` uses on that device (the CPU: 1).

    python bench/hvp_methods.py [--device cpu|cuda] [--data-dir DIR] [--k 16] [--repeats 7]
                                [--threads N] [--chunks 1,4,16] [--n 4000]
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


def _time_round_robin(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per function; the functions take turns, so that a burst of
    load on a shared machine hits all of them alike.
    """
    for fn in fns.values():  # warm-up (allocations, kernel selection, lazy imports)
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _data(
    data_dir: str | None, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir is None:
        return torch.randn(n, 784, generator=generator), torch.randint(
            0, 10, (n,), generator=generator
        )
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
    parser.add_argument(
        "--chunks", default="1,4,16", help="chunk sizes for the block rows (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 is steadier on a busy machine",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    x, y = _data(args.data_dir, args.n, gen)
    x, y = x.to(device), y.to(device)

    variants = {
        "double_backward": dict(method="double_backward", cache_graph=False),
        "double_backward, graph kept": dict(method="double_backward", cache_graph=True),
        "forward_over_reverse": dict(method="forward_over_reverse"),
    }
    chunks = sorted({int(c) for c in args.chunks.split(",") if c.strip()})
    grad_op = CurvatureOperator(model, x, y)
    p, k = grad_op.num_params, args.k
    v = torch.randn(p, generator=gen).to(device)
    block = torch.randn(p, k, generator=gen).to(device)

    fns: dict[str, Callable[[], object]] = {"gradient": grad_op.gradient}
    for name, kw in variants.items():
        single = CurvatureOperator(model, x, y, **kw)
        fns[f"1 HVP, {name}"] = lambda op=single: op.matvec(v)
        for c in chunks:
            op = CurvatureOperator(model, x, y, chunk_size=c, **kw)
            fns[f"{k} HVPs (block, chunk {c}), {name}"] = lambda op=op: op.matmat(block)
    results = _time_round_robin(fns, device, args.repeats)

    data = f"MNIST from {args.data_dir}" if args.data_dir else "random data"
    print(
        f"MLP 784-64-10 ({p:,} parameters), {args.n} inputs ({data}), one batch, {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    grad_median = results["gradient"][0]
    print(f"{'quantity':<52}{'median ms':>10}{'min ms':>9}{'/ gradient':>12}{'/ its 1 HVP':>13}")
    for name, (median, fastest) in results.items():
        method = name.split("), ", 1)[-1] if "block" in name else ""
        per_single = ""
        if "block" in name:
            per_single = f"{median / results[f'1 HVP, {method}'][0]:13.2f}"
        print(
            f"{name:<52}{1e3 * median:10.1f}{1e3 * fastest:9.1f}{median / grad_median:12.2f}{per_single}"
        )
    singles = {n: results[f"1 HVP, {n}"][0] for n in variants}
    print(f"fastest single HVP on {device.type}: {min(singles, key=singles.get)}")
    blocks = {n: t[0] for n, t in results.items() if "block" in n}
    best = min(blocks, key=blocks.get)
    print(
        f"fastest block of {k} on {device.type}: {best} ({blocks[best] / min(singles.values()):.2f} fastest singles)"
    )


if __name__ == "__main__":
    main()
