"""A `torch.export` archive as the base model: `model.exported: path/to/model.pt2` (torch.export.save).

What compression can do with it: an exported program is one flat graph of aten ops over its weights.
It has no nn.Conv2d or nn.Linear modules, and its reshapes were traced with fixed channel counts. So
every op that finds layers by type or changes shapes (channel_prune, low_rank, sparsify, kmeans,
quantize_int8, qat) has nothing to act on, and `shrinkflow check` refuses a plan that holds one
(`STRUCTURE_FREE_PHASES`). What works: distillation (fine-tuning the graph's weights from the base),
and compiling and benchmarking the graph. To prune or quantize, give the model's code instead
(model.factory + model.weights).

The graph runs as it was exported: its batch norms and dropouts keep the mode they were exported in
(train()/eval() on the wrapper do not change them). Its batch dimension must be dynamic (training and
evaluation batch sizes differ); a graph exported with a fixed batch is refused when loaded.

A checkpoint's arch record names the file and its sha256; the file must still be there, unchanged,
to rebuild from the checkpoint (the graph is the architecture: there is no other description of it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import ModelLoadError

# The op phases an exported graph supports (compression_ops' OpConfig.phase): fine-tuning only.
STRUCTURE_FREE_PHASES = ("finetune",)
HOW_TO_EXPORT = ("export it with a dynamic batch: torch.export.save(torch.export.export(model, (x,), "
                 "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')")


class ExportedModel(nn.Module):
    """An exported graph as a module that stages can switch between train() and eval() (the graph itself
    refuses both), so it is trained, evaluated and measured like any other model."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode  # the graph keeps the mode it was exported in
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def exportable(self) -> nn.Module:
        """What the engines export: the graph itself (tasks.engines.base.exportable)."""
        return self.graph


def file_of(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model.exported {spec!r}: no such file; give the .pt2 file torch.export.save wrote")
    return path.resolve()


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def portable_record(spec: str) -> dict[str, Any]:
    """The arch record of an exported model: the file and its content hash (checked when rebuilt)."""
    path = file_of(spec)
    return {"exported": str(path), "sha256": file_sha256(path), "kwargs": {}}


def load_exported(spec: str, *, sha256: str | None = None) -> ExportedModel:
    """The exported program's module, behind ExportedModel; `sha256`: refuse a file that changed since."""
    path = file_of(spec)
    if sha256 is not None and file_sha256(path) != sha256:
        raise ModelLoadError(
            f"model.exported {str(path)!r} changed since the checkpoint was written (sha256 differs); the "
            "checkpoint's weights belong to the old graph. Restore that file, or re-run the pipeline from train_base"
        )
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # not a .pt2, written by an incompatible torch
        raise ModelLoadError(f"model.exported {str(path)!r} is not a torch.export archive this torch "
                             f"({torch.__version__}) can read ({type(e).__name__}: {e}); {HOW_TO_EXPORT}") from e
    _check_dynamic_batch(program, path)
    return ExportedModel(program.module())


def _check_dynamic_batch(program: Any, path: Path) -> None:
    names = set(program.graph_signature.user_inputs)
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
    if len(inputs) != 1:
        raise ModelLoadError(f"model.exported {str(path)!r} takes {len(inputs)} inputs; shrinkflow models take one "
                             "image batch")
    val = inputs[0].meta.get("val")
    if val is not None and val.dim() > 0 and isinstance(val.shape[0], int):
        raise ModelLoadError(f"model.exported {str(path)!r} was exported for a fixed batch of {val.shape[0]}; "
                             f"training and evaluation use other batch sizes: {HOW_TO_EXPORT}")
