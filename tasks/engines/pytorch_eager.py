"""PyTorch eager as an engine: the reference every compiled engine is compared with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.engines.base import BuildJob, check_input, sha256_file
from tasks.errors import ArtifactError

if TYPE_CHECKING:
    from tasks.devices import Device


class TorchRunner:
    """An nn.Module in eval mode under inference_mode; `.run(x)` takes float32 NCHW, returns logits."""

    def __init__(self, model: Any, input_shape: tuple[int | None, ...] | None = None):
        import torch

        self._torch = torch
        self.model = model.eval()
        # None: the model itself decides which shapes it accepts.
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch x (of shape input_shape when one was given)."""
        if self.input_shape is None:
            x = np.ascontiguousarray(x, dtype=np.float32)
        else:
            x = check_input(x, self.input_shape, f"model {type(self.model).__name__}")
        with self._torch.inference_mode():
            # from_numpy shares memory: no copy, as the other engines get the array as is.
            out = self.model(self._torch.from_numpy(x))
        out = out[0] if isinstance(out, tuple | list) else out
        return out.numpy()


def load_eager(model: Any, input_shape: tuple[int | None, ...] | None = None) -> TorchRunner:
    """Wrap a model; input_shape uses None for a free batch size, e.g. (None, 1, 28, 28)."""
    return TorchRunner(model, input_shape)


# ------------------------------------------------------------------ engine adapter (tasks/engines/__init__.py)


def build(job: BuildJob) -> dict[str, Any]:
    """PyTorch runs the checkpoint the stage wrote: copied beside the other engines' artifacts, with a
    sidecar meta (model.pt.meta.json) holding its sha256."""
    if job.checkpoint is None:
        raise ArtifactError("the pytorch engine needs the model's checkpoint (BuildJob.checkpoint)")
    job.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.out.with_name(job.out.name + ".tmp")
    shutil.copyfile(job.checkpoint, tmp)
    tmp.replace(job.out)
    meta = {"engine": "pytorch", "file": job.out.name, "sha256": sha256_file(job.out), "bytes": job.out.stat().st_size}
    _meta_path(job.out).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _meta_path(artifact: Path) -> Path:
    """model.pt -> model.pt.meta.json (model.meta.json is the ONNX export's, in the same folder)."""
    return artifact.with_name(artifact.name + ".meta.json")


def read_meta(artifact: Path) -> dict[str, Any]:
    """The sidecar meta, after checking that the checkpoint matches its sha256."""
    rebuild = "re-run the compile stage to rebuild it"
    if not artifact.is_file():
        raise ArtifactError(f"checkpoint {artifact} is missing; {rebuild}")
    try:
        meta = json.loads(_meta_path(artifact).read_text())
        expected = meta["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"{_meta_path(artifact)} is missing or unreadable ({e}); {rebuild}") from e
    if sha256_file(artifact) != expected:
        raise ArtifactError(f"{artifact} does not match the sha256 in {_meta_path(artifact)} (corrupt or replaced); {rebuild}")
    return meta


def load(artifact: Path, device: Device, *, threads: int) -> TorchRunner:
    """The checkpoint, checked against its meta, rebuilt with its input shape."""
    from tasks.models.checkpoint import load_checkpoint

    read_meta(artifact)
    model, info = load_checkpoint(artifact)
    return TorchRunner(model, (None, *info["input_shape"]))


def describe(meta: dict[str, Any]) -> str:
    return f"checkpoint, {meta['bytes'] / 1e3:.1f} kB"
