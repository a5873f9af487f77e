"""VGG-16 (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", configuration D), in the CIFAR form used by the paper's authors.

Granziol (2020, arXiv 2006.09091, claim 3) compares SGD with Gadam (AdamW + iterate
averaging) on VGG-16, with and without BatchNorm, on CIFAR-100. The CIFAR form keeps the
13 3x3 convolutions (each followed by BatchNorm if ``batchnorm``, then ReLU) and the five
2x2 max-pools, and replaces the three fully connected layers by a single linear layer
512 -> C on the 1x1 feature map left of a 32x32 image.

Smaller inputs: a max-pool whose input is already 1 pixel high or wide would fail, so it
is replaced by an identity (digits 8x8 keep 3 of the 5 pools, MNIST 28x28 keeps 4).
An adaptive average pool before the classifier makes any input size end at 1x1.
``width_factor`` scales every channel count (at least 1 channel), e.g. 0.125 for tests.
"""

from __future__ import annotations

import torch
from torch import nn

from flatcli.errors import UsageError
from flatcli.models.registry import check_input_shape, register

# Output channels of each 3x3 convolution; "M" is a 2x2 max-pool.
VGG16: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]  # fmt: skip


@register("vgg16", help="VGG-16 for CIFAR (13 convs, one linear head); batchnorm, width_factor")
class VGG16Net(nn.Module):
    """VGG-16, CIFAR form (module doc)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        batchnorm: bool = True,
        width_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if not width_factor > 0:
            raise UsageError(f"model 'vgg16': width_factor must be > 0, got {width_factor}")
        channels, height, width = check_input_shape(input_shape, ndim=3)
        layers: list[nn.Module] = []
        for v in VGG16:
            if isinstance(v, str):  # "M"
                if min(height, width) < 2:  # nothing left to pool: keep the index, skip the op
                    layers.append(nn.Identity())
                else:
                    layers.append(nn.MaxPool2d(2))
                    height, width = height // 2, width // 2
                continue
            out = max(1, round(v * width_factor))
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        # He initialisation of the convolutions, as in the authors' (SWA-derived) code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` of a batch of inputs."""
        logits: torch.Tensor = self.classifier(self.pool(self.features(x)).flatten(1))
        return logits
