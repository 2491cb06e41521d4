"""A tiny CNN shared by the engine tests: conv-bn-relu, a residual add, avgpool, linear on 1x8x8."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.bn(self.conv(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


def randomize_bn(model: nn.Module, mean: float = 0.5, bias: float = 0.2) -> nn.Module:
    """Non-trivial BN statistics (mean, bias uniform in +-mean, +-bias), so a wrong BN lowering shows
    up in the outputs; returns the model in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-mean, mean)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -bias, bias)
    return model.eval()


@pytest.fixture(scope="session")
def bn_stats():
    """randomize_bn, for test modules in this folder."""
    return randomize_bn


@pytest.fixture(scope="session")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyResNet())


@pytest.fixture(scope="session")
def tiny_example() -> torch.Tensor:
    return torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
