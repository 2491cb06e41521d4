"""What every engine's runner offers: `.run(x) -> logits` on float32 NCHW numpy arrays."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from tasks.errors import ArtifactError, StageError

if TYPE_CHECKING:
    from tasks.devices import Device


class EngineUnsupported(StageError):
    """An engine cannot express this model: an op its importer lacks, an export or conversion it cannot
    do, a compiler pass that fails on the graph. The compile stage records a skip for that engine, model
    and target (the message is the reason) and builds the other engines. Everything else an engine
    raises stays an error: a corrupt artifact, or outputs that disagree with PyTorch (a wrong build)."""


def exportable(model: Any) -> Any:
    """The module the exporters trace: a model wrapping an already exported graph (model.exported, see
    tasks/models/exported.py) offers the graph through `exportable()`; traced through the wrapper, the
    graph's attributes end up nested where TVM's importer and the ONNX exporter cannot resolve them."""
    inner = getattr(model, "exportable", None)
    return inner() if callable(inner) else model


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, shortened: enough to say what failed in a log line."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


class InputShapeError(ArtifactError, ValueError):
    """An input whose shape the compiled artifact does not accept."""


@runtime_checkable
class Runner(Protocol):
    """A loaded model: float32 NCHW batch in, logits out. None in input_shape is a free batch size."""

    input_shape: tuple[int | None, ...]

    def run(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class BuildJob:
    """What an engine's build gets: one model for one device, and where to write it.

    The callables are lazy: only the engines that need calibration images or the quantized model pay for them.
    """

    model: Any  # the float model, in eval mode
    example: Any  # a batch-1 input tensor
    device: Device
    out: Path  # the engine's artifact: a file or a folder
    root: Path  # the compile folder; other engines' artifacts for the same model lie under it
    which: str = "compressed"  # "base" or "compressed"
    checkpoint: Path | None = None  # the checkpoint the model was loaded from (the pytorch engine's artifact)
    batch_sizes: tuple[int, ...] = (1, 32)
    pad_channels: bool = True  # widen pruned channel groups to whole vector registers first (exact)
    tuning_db: Path | None = None
    tuning_budget_s: float = 0.0
    calibration: Callable[[], np.ndarray] | None = None  # float32 NCHW images for int8 calibration
    calibration_method: str = "minmax"
    deployed: Callable[[], Any] | None = None  # the model as deployed: the plan's post-training ops applied

    def artifact_of(self, engine: str) -> Path:
        """Where another engine's artifact for the same model and device lies."""
        from tasks.engines import get_engine

        return self.root / get_engine(engine).artifact_path(self.which, self.device.name)


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


@contextlib.contextmanager
def quiet_torch_export() -> Iterator[None]:
    """Hide the FutureWarning torch.export's own internals raise in torch 2.13 (not ours to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def diff_vs_reference(
    model: Any, runner: Runner, example: Any, batch_sizes: Sequence[int]
) -> dict[str, float]:
    """Max abs difference between runner and model outputs at each batch size, keyed by str(batch)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    diffs: dict[str, float] = {}
    for b in batch_sizes:
        # The example's first row plus noise: real-looking inputs, and rows that differ.
        x = example[:1].repeat(b, *([1] * (example.dim() - 1)))
        x = x + 0.1 * torch.randn(x.shape, generator=gen)
        with torch.inference_mode():
            ref = model(x)
        ref = ref[0] if isinstance(ref, tuple | list) else ref
        diffs[str(b)] = float(np.max(np.abs(runner.run(x.numpy()) - ref.numpy())))
    return diffs


def export_failed(what: str, model: Any, err: Exception) -> EngineUnsupported:
    """The error for a model that torch.export (or the ONNX exporter on top of it) cannot capture: the
    engines that need an export skip the model, and the message says how to make it exportable."""
    return EngineUnsupported(
        f"{what} cannot capture {type(model).__name__} ({type(err).__name__}: {first_line(err)}). The model "
        "must be traceable by torch.export with a free batch size: no data-dependent Python control "
        "flow, and no hard-coded batch (use x.flatten(1), not x.view(32, -1)); full error above"
    )
