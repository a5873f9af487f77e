"""Fully connected ReLU network (multi-layer perceptron).

The paper (Granziol 2020, arXiv 2006.09091, claim 1) uses MLPs on MNIST to show that
large-weight, low-loss solutions have small Hessians. The default, 784-64-10 on MNIST
(50,890 parameters), is also the network on which the paper's summary compares the
speed of PyHessian and curvlinops.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from flatcli.models.registry import check_input_shape, check_int, register


@register("mlp", help="flatten + `depth` hidden ReLU layers of `width` units + linear head")
class MLP(nn.Module):
    """``d -> width (x depth) -> C`` with ReLU after each hidden layer.

    ``depth=0`` has no hidden layer and is logistic regression.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, *, width: int = 64, depth: int = 1
    ) -> None:
        super().__init__()
        check_int("mlp", "width", width, 1)
        check_int("mlp", "depth", depth, 0)
        d = math.prod(check_input_shape(input_shape))
        sizes = [d] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` of a batch of inputs."""
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        logits: torch.Tensor = self.head(x)
        return logits
