"""How much does ``flatcli train`` cost over a plain PyTorch loop (target: within 10%)?

Both train the same model on the same tensors with the same optimiser, batch size and
shuffling, in one process, alternating so that machine noise hits both alike:

* plain: ``randperm``, slice, forward, cross-entropy, backward, ``optimizer.step()``;
* flatcli epoch: :func:`flatcli.workflows.training.train_one_epoch` (regularisation hooks, running
  loss/accuracy, progress callback);
* flatcli run: the whole ``flatcli.train`` per epoch, which also evaluates the test set
  and writes the resumable state and metrics each epoch (reported separately: it is
  bookkeeping a plain loop does not do).

    python bench/train_overhead.py                      # digits, logreg and mlp
    python bench/train_overhead.py --data-dir ../shared/data/mnist5k --dataset mnist
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from flatcli import build_model, load_dataset, make_train_config, train
from flatcli.workflows.data import get_spec
from flatcli.workflows.training import OPTIMIZERS, train_one_epoch


def plain_epoch(model, optimizer, x, y, batch_size, generator):
    model.train()
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--models", default="logreg,mlp,cnn")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    spec = get_spec(args.dataset)
    x, y = load_dataset(args.dataset, "train", args.data_dir).tensors
    print(
        f"{args.dataset}: {len(y)} images, batch {args.batch_size}, {args.epochs} epochs, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'model':8} {'plain s/epoch':>14} {'flatcli epoch':>14} {'ratio':>6} {'flatcli run':>12} {'ratio':>6}"
    )
    for name in args.models.split(","):
        config = make_train_config(
            dataset=args.dataset,
            model=name,
            batch_size=args.batch_size,
            epochs=args.epochs,
            device="cpu",
            data_dir=args.data_dir,
        )
        plain, ours = [], []
        torch.manual_seed(0)
        m1 = build_model(name, input_shape=spec.input_shape, num_classes=spec.num_classes)
        m2 = build_model(name, input_shape=spec.input_shape, num_classes=spec.num_classes)
        m2.load_state_dict(m1.state_dict())
        o1 = OPTIMIZERS["sgd"](list(m1.parameters()), config)
        o2 = OPTIMIZERS["sgd"](list(m2.parameters()), config)
        for epoch in range(args.epochs + 1):  # the first epoch of each warms up
            t = time.perf_counter()
            plain_epoch(m1, o1, x, y, args.batch_size, torch.Generator().manual_seed(epoch))
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            train_one_epoch(
                m2,
                o2,
                x,
                y,
                config,
                torch.Generator().manual_seed(epoch),
                False,
                lambda batch, loss: None,
            )
            t2 = time.perf_counter() - t
            if epoch:
                plain.append(t1)
                ours.append(t2)
        with tempfile.TemporaryDirectory() as tmp:
            result = train(
                make_train_config(
                    dataset=args.dataset,
                    model=name,
                    batch_size=args.batch_size,
                    epochs=args.epochs,
                    device="cpu",
                    data_dir=args.data_dir,
                    out=Path(tmp) / "run",
                )
            )
        run_epoch = statistics.median(r.seconds for r in result.history)
        p, o = statistics.median(plain), statistics.median(ours)
        print(f"{name:8} {p:14.4f} {o:14.4f} {o / p:6.2f} {run_epoch:12.4f} {run_epoch / p:6.2f}")


if __name__ == "__main__":
    main()
