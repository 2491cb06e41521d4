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


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> reduce -> ReLU -> expand -> hard-sigmoid gate (MobileNetV3)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.expand(torch.relu(self.reduce(self.pool(x))))
        return x * nn.functional.hardsigmoid(s)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise kxk -> (SE) -> project 1x1, with a residual add when shapes allow."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int, se: bool, hswish: bool):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU

        def conv_bn(a: int, b: int, kernel: int, s: int, groups: int, activation: bool) -> nn.Sequential:
            layers = [nn.Conv2d(a, b, kernel, s, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(b)]
            return nn.Sequential(*layers, act()) if activation else nn.Sequential(*layers)

        self.expand = conv_bn(cin, hidden, 1, 1, 1, True) if hidden != cin else nn.Identity()
        self.dw = conv_bn(hidden, hidden, k, stride, hidden, True)
        self.se = SqueezeExcite(hidden, max(8, hidden // 4)) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1, 1, 1, False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Tiny(nn.Module):
    """MobileNetV3-Small's building blocks (inverted residuals, squeeze-excitation, hard-swish), sized
    for 28x28 inputs."""

    # (kernel, expanded, out, SE, hard-swish, stride) per block, before the width multiplier.
    CFG = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
           (5, 96, 40, True, True, 1), (5, 240, 40, True, True, 1), (5, 144, 48, True, True, 2))

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0, last: int = 256):
        super().__init__()

        def w(c: int) -> int:
            return max(8, int(round(c * width / 8)) * 8)

        cin = w(16)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.Hardswish())
        blocks = []
        for k, hidden, cout, se, hs, s in self.CFG:
            blocks.append(InvertedResidual(cin, w(hidden), w(cout), k, s, se, hs))
            cin = w(cout)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, w(cin * 6), 1, bias=False), nn.BatchNorm2d(w(cin * 6)), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(w(cin * 6), last), nn.Hardswish(), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


@register_model("mobilenet_v3_tiny")
def mobilenet_v3_tiny(in_channels: int, num_classes: int, width: float = 1.0, last: int = 256) -> nn.Module:
    return MobileNetV3Tiny(in_channels, num_classes, width, last)
