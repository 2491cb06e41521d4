"""A small residual CNN family (ResNet-8/10 style, CIFAR-type stem) for small grey or colour images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks: tuple[int, ...] = (1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet8")
def resnet8(in_channels: int, num_classes: int, width: int = 16) -> nn.Module:
    """3 stages of one basic block: about 9.5 M MACs and 78 k parameters at width 16 on 1x28x28."""
    return ResNet(in_channels, num_classes, width, (1, 1, 1))


@register_model("resnet10")
def resnet10(in_channels: int, num_classes: int, width: int = 16) -> nn.Module:
    """4 stages of one basic block."""
    return ResNet(in_channels, num_classes, width, (1, 1, 1, 1))


@register_model("resnet10_wide")
def resnet10_wide(in_channels: int, num_classes: int, width: int = 32) -> nn.Module:
    """Stages of 32/64/128 channels with one, two and one basic blocks (10 weight layers): about 51 M MACs
    and 380 k parameters on 1x28x28; the wider net of bench/frontier.py."""
    return ResNet(in_channels, num_classes, width, (1, 2, 1))
