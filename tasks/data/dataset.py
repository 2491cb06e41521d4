"""A split image-classification data set, stored as uint8 arrays and identified by a content hash."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import ArtifactError

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Images as uint8 NCHW, labels as int64, for the three splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for s in SPLITS:
            out[f"x_{s}"] = getattr(self, f"x_{s}")
            out[f"y_{s}"] = getattr(self, f"y_{s}")
        return out

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def content_hash(self) -> str:
        """sha256 over every array's dtype, shape and bytes, and the class names."""
        h = hashlib.sha256()
        for k, a in self.arrays().items():
            a = np.ascontiguousarray(a)
            h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
        h.update(("|".join(self.classes)).encode())
        return h.hexdigest()

    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, on the 0..1 scale."""
        return normalization(self.x_train)

    def summary(self) -> dict[str, Any]:
        mean, std = self.normalization()
        return {
            "source": self.source,
            "hash": self.content_hash(),
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "num_classes": self.num_classes,
            "sizes": {s: int(len(getattr(self, f"y_{s}"))) for s in SPLITS},
            "mean": mean,
            "std": std,
            **self.info,
        }


def normalization(x_train: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, C, H, W], on the 0..1 scale (std + 1e-6)."""
    x = x_train.astype(np.float32) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3)) + 1e-6
    return [float(m) for m in mean], [float(s) for s in std]


def save_dataset(ds: Dataset, store: Path, dest: Path) -> str:
    """Write the arrays once into a content-addressed store and link them to `dest`; return the hash."""
    digest = ds.content_hash()
    store.mkdir(parents=True, exist_ok=True)
    stored = store / f"{ds.source}-{digest[:16]}.npz"
    if not stored.exists():
        fd, tmp = tempfile.mkstemp(dir=store, prefix=".npz.", suffix=".tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, classes=np.array(ds.classes), **ds.arrays())
            os.replace(tmp, stored)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(stored, dest)  # same bytes for every run that sees the same data
    except OSError:
        import shutil

        shutil.copyfile(stored, dest)
    return digest


def load_dataset_file(path: Path, expect_hash: str | None = None, source: str = "") -> Dataset:
    """Read a saved data set; check its hash when one is expected."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable data set ({e}); re-run the prepare_data stage") from e
    classes = [str(c) for c in arrays.pop("classes")]
    ds = Dataset(classes=classes, source=source, **arrays)
    if expect_hash is not None and ds.content_hash() != expect_hash:
        raise ArtifactError(f"{path} does not match its recorded hash; re-run the prepare_data stage")
    return ds


def stratified_split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off `fraction` of each class (deterministic for a seed): (x_keep, y_keep, x_out, y_out)."""
    rng = np.random.default_rng(seed)
    out_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_out = max(1, round(len(idx) * fraction))
        out_idx.append(idx[:n_out])
    out = np.sort(np.concatenate(out_idx))
    keep = np.setdiff1d(np.arange(len(y)), out)
    return x[keep], y[keep], x[out], y[out]
