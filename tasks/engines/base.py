"""What every engine's runner offers: `.run(x) -> logits` on float32 NCHW numpy arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from tasks.errors import ArtifactError


class InputShapeError(ArtifactError, ValueError):
    """An input whose shape the compiled artifact does not accept."""


@runtime_checkable
class Runner(Protocol):
    """A loaded model: float32 NCHW batch in, logits out. None in input_shape is a free batch size."""

    input_shape: tuple[int | None, ...]

    def run(self, x: np.ndarray) -> np.ndarray: ...


def check_input(x: np.ndarray, expected: Sequence[int | None], what: str) -> np.ndarray:
    """x as a C-contiguous float32 array, or InputShapeError naming expected and got shapes."""
    x = np.asarray(x)
    ok = x.ndim == len(expected) and all(e is None or e == g for e, g in zip(expected, x.shape, strict=True))
    if not ok:
        want = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ")"
        raise InputShapeError(
            f"{what} expects input shape {want}, got {tuple(x.shape)}; "
            "resize the data to the model's input or rebuild the artifact for this shape"
        )
    # No copy when the caller already passes float32 C-order (the benchmark does).
    return np.ascontiguousarray(x, dtype=np.float32)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
