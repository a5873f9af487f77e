"""Wide Residual Network (Zagoruyko & Komodakis 2016, "Wide Residual Networks",
arXiv 1605.07146), WRN-``depth``-``widen``.

Granziol (2020, arXiv 2006.09091) uses WRN-28-10 without dropout on CIFAR. The network is
a pre-activation ResNet of basic blocks (see :mod:`flatcli.models.preresnet`) with
``n = (depth - 4) / 6`` blocks per stage at 16k, 32k and 64k channels (k = ``widen``),
after a 3x3 convolution to 16 channels, and a final BN-ReLU, global average pooling and
linear layer. ``dropout`` > 0 puts a Dropout between the two convolutions of each block;
at the default 0 there is no Dropout module at all.
"""

from __future__ import annotations

import torch
from torch import nn

from flatcli.errors import UsageError
from flatcli.models.preresnet import PreActBlock, conv, he_init
from flatcli.models.registry import check_input_shape, check_int, register


@register(
    "wrn",
    help="Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016); default 28-10, no dropout",
)
class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen`` (module doc)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        depth: int = 28,
        widen: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("wrn", "widen", widen, 1)
        if depth < 10 or (depth - 4) % 6:
            hint = "depth - 4 must be a multiple of 6: 10, 16, 22, 28, 40"
            raise UsageError(f"model 'wrn': invalid depth {depth}", hint=hint)
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"model 'wrn': dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        in_channels = check_input_shape(input_shape, ndim=3)[0]
        self.conv1 = conv(in_channels, 16, 3)
        stages, c_in = [], 16
        for i, planes in enumerate([16 * widen, 32 * widen, 64 * widen]):
            blocks = []
            for j in range(n):
                blocks.append(
                    PreActBlock(c_in, planes, stride=2 if i > 0 and j == 0 else 1, dropout=dropout)
                )
                c_in = planes
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
