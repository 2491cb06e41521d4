"""In-memory batch iterators: normalised float tensors, shuffled per epoch, optional shift/flip augmentation.

The data sets here fit in memory many times over; a DataLoader with workers would only add overhead
on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tasks.data.dataset import Dataset


def to_tensor(x: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    t = torch.from_numpy(np.array(x)).float().div_(255.0)  # np.array copies: npz arrays are read-only
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (t - m) / s


class TensorBatches:
    """Iterable of (x, y) batches; a fresh shuffle every time it is iterated when shuffle=True."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            xb = self.x[idx]
            if self.augment:
                xb = self._augment(xb)
            yield xb, self.y[idx]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random shifts of up to 2 pixels (pad + crop) and horizontal flips."""
        pad = 2
        b, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=self.gen).tolist()
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=self.gen).tolist()
        out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
        flip = torch.rand(b, generator=self.gen) < 0.5
        out[flip] = out[flip].flip(-1)
        return out


class Splits:
    """Tensors of every split of a data set, normalised with the training mean and std."""

    def __init__(self, ds: Dataset, mean: list[float] | None = None, std: list[float] | None = None):
        if mean is None or std is None:
            mean, std = ds.normalization()
        self.mean, self.std = mean, std
        self.ds = ds
        self.tensors = {
            s: (to_tensor(getattr(ds, f"x_{s}"), mean, std), torch.from_numpy(np.array(getattr(ds, f"y_{s}"))).long())
            for s in ("train", "val", "test")
        }

    def batches(
        self, split: str, batch_size: int = 256, *, train: bool = False, augment: bool = False, seed: int = 0
    ) -> TensorBatches:
        x, y = self.tensors[split]
        # Dropping a ragged last batch keeps BatchNorm statistics sane, unless the split is tiny.
        drop = train and len(y) >= 2 * batch_size
        return TensorBatches(x, y, batch_size, shuffle=train, augment=augment and train, seed=seed, drop_last=drop)

    def example(self, batch: int = 1) -> torch.Tensor:
        return self.tensors["test"][0][:batch].clone()
