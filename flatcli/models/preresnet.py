"""Pre-activation ResNet for CIFAR (He, Zhang, Ren & Sun 2016, "Identity Mappings in Deep
Residual Networks", arXiv 1603.05027).

Granziol (2020, arXiv 2006.09091) reports the spectra of PreResNet-110 on CIFAR-100 for
SGD, AdamW and Gadam, with and without weight decay. Layout, as in the CIFAR code the
authors build on:

- a 3x3 convolution to ``width`` channels;
- three stages of ``n`` residual blocks at ``width``, ``2 width`` and ``4 width`` planes,
  the 2nd and 3rd starting with stride 2;
- BatchNorm, ReLU, global average pooling and a linear classifier.

A block computes ``x + F(x)`` where F is BN-ReLU-conv repeated (pre-activation). Depths of
44 and more use bottleneck blocks (1x1, 3x3, 1x1 convolutions; the output has 4x the
planes) with ``n = (depth - 2) / 9``, so PreResNet-110 has 12 bottlenecks per stage; lower
depths use basic blocks (two 3x3 convolutions) with ``n = (depth - 2) / 6``. When a block
changes the shape, its shortcut is a 1x1 convolution of the pre-activated input
(BN-ReLU is shared by both branches); otherwise the shortcut is the identity and adds no
parameters. Convolutions have no bias: a BatchNorm shift follows each one.
"""

from __future__ import annotations

import torch
from torch import nn

from flatcli.errors import UsageError
from flatcli.models.registry import check_input_shape, check_int, register


def he_init(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), BatchNorm scale 1 and shift 0, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free square convolution with "same" padding (a BatchNorm shift follows it)."""
    return nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class PreActBlock(nn.Module):
    """Basic pre-activation block: BN-ReLU-conv3x3 (stride) - BN-ReLU-[dropout]-conv3x3.

    Also the block of Wide ResNets, which add dropout between the two convolutions.
    """

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv(c_in, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(planes, planes, 3)
        self.shortcut = conv(c_in, planes, 1, stride) if stride != 1 or c_in != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the block's residual branch."""
        a = torch.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        total: torch.Tensor = residual + out
        return total


class PreActBottleneck(nn.Module):
    """Bottleneck pre-activation block: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride),
    BN-ReLU-conv1x1 to ``4 * planes`` channels.
    """

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv(c_in, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv(planes, c_out, 1)
        self.shortcut = conv(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the block's residual branch."""
        a = torch.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        total: torch.Tensor = residual + out
        return total


def blocks_per_stage(depth: int) -> tuple[type[PreActBlock | PreActBottleneck], int]:
    """(block type, blocks per stage) of a CIFAR PreResNet of ``depth`` layers."""
    block: type[PreActBlock | PreActBottleneck]
    block, layers_per_block = (PreActBottleneck, 9) if depth >= 44 else (PreActBlock, 6)
    if depth < 8 or (depth - 2) % layers_per_block:
        raise UsageError(
            f"model 'preresnet': invalid depth {depth}",
            hint="depth - 2 must be a multiple of 6 below 44 (basic blocks: 8, 14, 20, 26, 32, 38) "
            "and of 9 from 44 (bottlenecks: 47, 56, ..., 110, 164)",
        )
    return block, (depth - 2) // layers_per_block


@register(
    "preresnet", help="pre-activation ResNet for CIFAR (He et al. 2016); depth 110 uses bottlenecks"
)
class PreResNet(nn.Module):
    """CIFAR PreResNet of ``depth`` layers, ``width`` channels in its first stage (module doc)."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, *, depth: int = 110, width: int = 16
    ) -> None:
        super().__init__()
        check_int("preresnet", "width", width, 1)
        block, n = blocks_per_stage(depth)
        in_channels = check_input_shape(input_shape, ndim=3)[0]
        self.conv1 = conv(in_channels, width, 3)
        stages, c_in = [], width
        for i, planes in enumerate([width, 2 * width, 4 * width]):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, planes, stride=2 if i > 0 and j == 0 else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` of a batch of inputs."""
        x = self.stages(self.conv1(x))
        x = torch.relu(self.bn(x))
        logits: torch.Tensor = self.fc(self.pool(x).flatten(1))
        return logits
