"""A small convolutional network: the paper's "simple CNN" on MNIST-sized images.

Granziol (2020, arXiv 2006.09091) shows for simple CNNs, as for MLPs, that weight decay
gives sharper solutions. This one is two 3x3 convolutions (``channels`` and
``2 * channels`` filters), each followed by ReLU and 2x2 max-pooling, then global average
pooling and a linear classifier. Pooling rounds up and the global pool ends at 1x1, so
any input size works (digits 8 -> 4 -> 2; MNIST 28 -> 14 -> 7; CIFAR 32 -> 16 -> 8).

With ``batchnorm=True`` a BatchNorm follows each convolution (before the ReLU): the loss
is then invariant to the scale of the convolution weights, L(a w) = L(w), while
H(a w) = H(w) / a^2 (see the paper's summary). The convolutions keep their bias either
way, as in the authors' VGG code; with BatchNorm that bias is a direction of zero curvature.
"""

from __future__ import annotations

import torch
from torch import nn

from flatcli.models.registry import check_input_shape, check_int, register


@register(
    "cnn", help="2 conv layers (channels, 2*channels) + ReLU + max-pool, global avg-pool, linear"
)
class CNN(nn.Module):
    """Two convolutions (``channels``, ``2 channels``), each ReLU and max-pool, then a linear head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: int = 16,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        check_int("cnn", "channels", channels, 1)
        in_channels = check_input_shape(input_shape, ndim=3)[0]
        layers: list[nn.Module] = []
        for c_in, c_out in [(in_channels, channels), (channels, 2 * channels)]:
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` of a batch of inputs."""
        logits: torch.Tensor = self.fc(self.pool(self.features(x)).flatten(1))
        return logits
