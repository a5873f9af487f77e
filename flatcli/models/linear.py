"""Multinomial logistic regression: the linear model of the paper's first experiment.

Granziol (2020, "Flatness is a False Friend", arXiv 2006.09091) trains it on MNIST
(784 -> 10). Its cross-entropy Hessian is known in closed form,
``H = (1/N) sum_i (diag(p_i) - p_i p_i^T) kron x~_i x~_i^T`` with ``x~ = [x, 1]``, which
makes it the model on which every curvature estimate can be checked exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flatcli.models.registry import check_input_shape, register


@register("logreg", help="logistic regression: flatten + one linear layer (d*C + C parameters)")
class LogReg(nn.Module):
    """Logits ``W x + b`` of the flattened input ``x`` (d = C*H*W features)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        d = math.prod(check_input_shape(input_shape))
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` of a batch of inputs."""
        logits: torch.Tensor = self.fc(x.flatten(1))
        return logits
