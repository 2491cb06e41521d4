"""scikit-learn's digits for the op tests that need a trained net: real data, small enough to train in seconds.

Images upsampled to 16x16 (ResNet-8's three stages need the room) and normalised, shuffled once with a
fixed seed, split 1400 train / 397 test.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (the model is put in eval mode)."""
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean()) * 100
