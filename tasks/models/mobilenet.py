"""A depthwise-separable CNN family in the MobileNet style, sized for small images."""

from __future__ import annotations

import torch
from torch import nn

from tasks.models.registry import register_model


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = _conv_bn(cin, cin, 3, stride, groups=cin)
        self.pw = _conv_bn(cin, cout, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNetTiny(nn.Module):
    # (output channels, stride) per depthwise-separable block, before the width multiplier.
    CFG = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()

        def w(c: int) -> int:
            return max(8, int(round(c * width / 8)) * 8)

        cin = w(16)
        self.stem = _conv_bn(in_channels, cin, 3, 1)
        blocks = []
        for c, s in self.CFG:
            blocks.append(DepthwiseSeparable(cin, w(c), s))
            cin = w(c)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("mobilenet_tiny")
def mobilenet_tiny(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return MobileNetTiny(in_channels, num_classes, width)
