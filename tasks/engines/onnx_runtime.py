"""Export a PyTorch model to one self-contained ONNX file and run it with ONNX Runtime on the CPU.

Export uses torch's dynamo exporter (torch.export + onnxscript, the default in torch 2.13) with the
weights embedded (`external_data=False`), so the .onnx file is the whole artifact. A sidecar
`<name>.meta.json` records its sha256, shapes and the max abs diff vs PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from tasks.devices import Device
from tasks.engines.base import (
    BuildJob,
    EngineUnsupported,
    check_input,
    diff_vs_reference,
    export_failed,
    exportable,
    first_line,
    quiet_torch_export,
    sha256_file,
)
from tasks.errors import ArtifactError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 20


def meta_path(path: Path) -> Path:
    """The sidecar meta file of an .onnx file: model.onnx -> model.meta.json."""
    return Path(path).with_suffix(".meta.json")


def export_onnx(
    model: Any,
    example: Any,
    path: Path,
    *,
    dynamic_batch: bool = True,
    batch_sizes: tuple[int, ...] = (1, 32),
) -> dict[str, Any]:
    """Write model as a single .onnx file (checked by onnx.checker); returns meta with max abs diff."""
    import logging

    import onnx
    import torch
    from torch.export import Dim

    # The exporter warns once per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = example.detach().to(torch.float32).cpu()
    if dynamic_batch:
        # torch specializes a size-1 dim to a constant; export at batch 2 to keep it symbolic.
        args = (example[:1].repeat(2, *([1] * (example.dim() - 1))),)
        dynamic_shapes: tuple | None = ({0: Dim("batch", min=1)},)
    else:
        args, dynamic_shapes = (example,), None
    meta_path(path).unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # The exporter prints progress lines for every step; keep the pipeline's logs readable.
    try:
        with contextlib.redirect_stdout(io.StringIO()), quiet_torch_export():
            torch.onnx.export(
                exportable(model),
                args,
                str(tmp),
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic_shapes,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types (torch.export's, onnxscript's)
        tmp.unlink(missing_ok=True)
        raise conversion_failed(model, e) from e
    strip_metadata(tmp)
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    tmp.replace(path)

    try:
        runner = load_onnx(path, threads=1, verify=False)
    except ArtifactError as e:  # a just-written, checked file: ONNX Runtime lacks a kernel for it
        path.unlink(missing_ok=True)
        raise EngineUnsupported(f"ONNX Runtime cannot run the export of {type(model).__name__}: {e}") from e
    sizes = batch_sizes if dynamic_batch else (example.shape[0],)
    diffs = diff_vs_reference(model, runner, example, sizes)

    meta = {
        "engine": "onnxruntime",
        "file": path.name,
        "sha256": sha256_file(path),
        "input_name": INPUT_NAME,
        "input_shape": [
            None if dynamic_batch else int(example.shape[0]),
            *[int(d) for d in example.shape[1:]],
        ],
        "input_dtype": "float32",
        "output_names": [OUTPUT_NAME],
        "opset": OPSET,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "max_abs_diff": max(diffs.values()),
        "max_abs_diff_by_batch": diffs,
    }
    meta_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def conversion_failed(model: Any, err: Exception) -> EngineUnsupported:
    """EngineUnsupported for a failed ONNX export: torch.export's capture (the model's to fix, see
    export_failed), or the exporter's own decomposition or translation (e.g. Swin's window attention: a
    view of a non-contiguous tensor), with the exception the exporter summarises."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "step 1/3" in text or "## Exception summary" not in text:
        return export_failed("the ONNX exporter", model, err)
    summary = text.split("## Exception summary", 1)[1].strip().splitlines()
    cause = summary[0].strip()[:300] if summary else first_line(err)
    where = next((ln.strip()[:200] for ln in summary if ln.startswith("While executing")), "")
    step = re.search(r"Failed to (\w+)", text)
    return EngineUnsupported(
        f"the ONNX exporter cannot {step.group(1) if step else 'convert'} {type(model).__name__} for ONNX "
        f"({cause}{'; ' + where if where else ''}); torch.export captures it, so PyTorch still runs it"
    )


def strip_metadata(path: Path) -> None:
    """Drop per-node metadata (the exporter's source locations and FX names, ~25 kB for a ResNet-8):
    it is debugging detail, not model, and would be a tenth of what a device downloads."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


class ONNXRunner:
    """An ONNX Runtime CPU session; `.run(x)` takes float32 NCHW, returns the first output."""

    def __init__(self, session: Any, path: Path):
        self._session = session
        self._path = path
        inp = session.get_inputs()[0]
        self._input_name = inp.name
        # ONNX Runtime reports a symbolic dim as a string (e.g. "batch"): any size goes.
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch x of shape input_shape."""
        x = check_input(x, self.input_shape, f"ONNX model {self._path}")
        return self._session.run(None, {self._input_name: x})[0]


def load_onnx(path: Path, threads: int, *, verify: bool = True) -> ONNXRunner:
    """An ONNX Runtime session on path with `threads` intra-op threads, one inter-op, sequential."""
    import onnxruntime as ort

    path = Path(path)
    rerun = "re-run the export stage to rebuild it"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {rerun}")
    meta_file = meta_path(path)
    if verify and meta_file.is_file():
        try:
            expected = json.loads(meta_file.read_text())["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArtifactError(f"{meta_file} is unreadable ({e}); {rerun}") from e
        if sha256_file(path) != expected:
            raise ArtifactError(
                f"{path} does not match the sha256 in {meta_file} (corrupt or replaced); {rerun}"
            )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers would keep cores busy after a call and slow the engine timed next to it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own (non-exported) exception types
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({type(e).__name__}: {e}); {rerun}") from e
    return ONNXRunner(session, path)


# ------------------------------------------------------------------ engine adapter (tasks/engines/__init__.py)


def build(job: BuildJob) -> dict[str, Any]:
    """The fp32 ONNX export. ONNX Runtime's CPU kernels block channels by the vector width too: padded
    pruned widths ran its fp32 model 1.4-1.7x and its int8 model 1.6-2.2x faster at batch 32 here."""
    from tasks.engines.pad_channels import pad_channels
    from tasks.engines.tvm_schedule import device_lanes

    model, padding = (pad_channels(job.model, job.example, device_lanes(job.device)) if job.pad_channels
                      else (job.model, {"padded": False}))
    meta = export_onnx(model, job.example, job.out)
    meta["channel_padding"] = padding
    meta_path(job.out).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(artifact: Path) -> dict[str, Any]:
    """The sidecar meta of an .onnx file (ArtifactError when it is missing or unreadable)."""
    path = meta_path(artifact)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is missing or unreadable ({e}); re-run the compile stage") from e


def load(artifact: Path, device: Device, *, threads: int) -> ONNXRunner:
    return load_onnx(artifact, threads)


def describe(meta: dict[str, Any]) -> str:
    padded = meta.get("channel_padding", {})
    widths = f", channels padded to multiples of {padded['multiple']}" if padded.get("padded") else ""
    return f"max |diff| vs PyTorch {meta['max_abs_diff']:.2e}{widths}"
