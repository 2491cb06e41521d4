"""Static int8 quantization of an exported fp32 ONNX model, run by ONNX Runtime's int8 CPU kernels.

The graph is quantized in QDQ form (ONNX Runtime's recommended CPU format): QUInt8 activations per
tensor, QInt8 symmetric weights per output channel, which ONNX Runtime fuses into QLinearConv /
QGemm-style kernels when it loads the model. Activation ranges come from compression_ops.quantize's
choose_range (the same calibration as the PyTorch simulation): the fp32 graph runs on the calibration
data with every float tensor exposed, and the ranges reach ONNX Runtime's quantizer as
TensorQuantOverrides rmin/rmax, which replace its own calibrator's figures. On x86 CPUs without VNNI
the weights use 7 of the 8 bits (reduce_range; see cpu_needs_reduce_range), so there the artifact's
weights are one bit coarser than the PyTorch simulation's.

The exporter already folds BatchNorm into Conv (torch's ONNX optimizer) and ONNX Runtime's
quant_pre_process folds what is left, so no BatchNormalization reaches the quantizer.

The stem stays fp32 (float_stem, the default): the convolutions that read the image itself. With one
(or three) input channels a 3x3 conv reduces over only 9 (27) products per output, so ONNX Runtime's
int8 QLinearConv (im2col + u8s8 GEMM, NHWC) spends its time packing and requantizing, not multiplying,
while the fp32 stem runs as a direct NCHWc convolution. Measured on a 2-core AVX2 EPYC without VNNI
(ResNet-8 on 1x28x28, channel-pruned to widths 11/22/45, batch 32, per-node medians from ONNX
Runtime's profiler): the int8 stem took 1.05 ms (1 thread) / 1.3 ms (2 threads) against 0.16 ms in
fp32 plus 0.1 ms to quantize its output, i.e. 15-20 % of the whole int8 run; the 28x28 convs with 11
channels were barely faster in int8 (1.5 vs 1.8 ms each), the 22/45-channel ones 2-3x faster. The
stem is also where 7-bit weights hurt most: top-1 agreement with fp32 on the Fashion-MNIST test set
went from 96.9 % to 99.0 % (a model trained 1 epoch, many near-ties) and from 99.23 % to 99.30 % (trained
2 epochs) with the stem in fp32. Every QDQ pair in the rest of the graph fuses (QLinearConv with the
ReLU folded into its output range, QLinearAdd for the residual adds, QGemm for the classifier; only the
global average pool runs in float between a DequantizeLinear and a QuantizeLinear).

Transformers: only what the PyTorch simulation quantizes is quantized (QUANTIZED_OPS, float_nodes):
Linear layers (MatMul/Gemm with a constant weight) and convs; LayerNorm, Softmax, GELU, layer-scale and
gate Muls and the attention's activation x activation MatMuls stay float. Quantizing everything the
quantizer knows (its default) took the ViT family's top-1 agreement with the fake-quant PyTorch model
to 61 %; with these rules it is 97 % (DeiT 93 %, ConvNeXt 97 %, MobileViT 93 %; 256 random images,
randomly initialised tiny models, where the fake-quant model itself agrees with float only 94-98 %).

Also measured and not taken: QOperator format (QLinearConv written directly) gave wrong logits with
these TensorQuantOverrides (agreement 14 %) and the same speed as QDQ; int8 activations (s8s8) left six
convs unfused (slower than fp32); uint8 weights (u8u8, 8-bit) were 10 % slower than u8s8 at batch 32;
per-tensor weights lost agreement (98.3 %) for no speed. Channel counts matter as much as the stem: the
same model with its widths padded to multiples of 8 (tasks.engines.pad_channels(model, example, 8),
applied before export) ran int8 at 0.6x the unpadded fp32 model and about 0.8x the padded fp32 one at
batch 32, against 0.7-0.8x unpadded; quantize a padded export where the int8 plan is deployed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tasks.engines.base import BuildJob, sha256_file
from tasks.engines.onnx_runtime import load as onnx_load
from tasks.engines.onnx_runtime import load_onnx, meta_path, strip_metadata
from tasks.engines.onnx_runtime import read_meta as onnx_read_meta
from tasks.errors import StageError

METHODS = ("minmax", "percentile", "mse")
# What the quantizer may touch: the layers the PyTorch simulation quantizes (Conv2d -> Conv, Linear ->
# MatMul/Gemm with a constant weight), a convnet's residual Add (fused as QLinearAdd), the activations
# folded into a quantized output range, and ops that only move int8 data. LayerNorm, Softmax, GELU,
# Mul (layer scale, squeeze-excitation, hard-swish), Where, Concat and Gather stay float, as in PyTorch;
# float_nodes picks the MatMuls and Adds among these that stay float too.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "MaxPool",
                 "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
# Op types of ONNX Runtime's integer kernels: at least one must be left after session optimization.
INT8_OPS = frozenset({
    "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearReduceMean",
    "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
    "DynamicQuantizeMatMul",
})


def cpu_needs_reduce_range() -> bool:
    """True on x86 CPUs without VNNI. Their int8 GEMM (AVX2 vpmaddubsw) adds pairs of u8 x s8 products in
    16 bits, which saturate with full-range int8 weights; ONNX Runtime's guidance is 7-bit weights there.
    Measured on an AVX2 EPYC: logits off the QDQ reference by 6 quantization steps with 8-bit weights,
    by 1 with reduce_range."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the older CPU, whose results stay right either way
        return True
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _session(path: Path, *, optimized_to: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_to is not None:
        opts.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def optimized_op_types(path: Path) -> Counter:
    """Op types (with counts) of the graph ONNX Runtime actually runs for path on this CPU."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="ort_opt.") as d:
        opt = Path(d) / "optimized.onnx"
        _session(Path(path), optimized_to=opt)
        return Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def int8_kernel_ops(path: Path) -> list[str]:
    """The integer-kernel op types (QLinearConv, ...) in ONNX Runtime's optimized graph for path."""
    return sorted(set(optimized_op_types(path)) & INT8_OPS)


def _batches(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield np.ascontiguousarray(x[i : i + size], dtype=np.float32)


def activation_ranges(
    model_path: Path, calib: np.ndarray, method: str, *, percentile: float = 99.99, batch_size: int = 64
) -> dict[str, tuple[float, float]]:
    """(rmin, rmax) of every float tensor of the graph that is not a weight, from choose_range (unsigned)."""
    import onnx
    import torch

    from compression_ops.quant_ranges import RangeObserver

    model = onnx.load(str(model_path))
    g = model.graph
    inits = {i.name for i in g.initializer}
    typed = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    float_t = onnx.TensorProto.FLOAT
    names = [i.name for i in g.input if i.name not in inits]
    for n in g.node:
        names += [o for o in n.output if o and o in typed and typed[o].type.tensor_type.elem_type == float_t]
    names = list(dict.fromkeys(names))
    present = {o.name for o in g.output}
    g.output.extend(typed[n] for n in names if n not in present)
    with tempfile.TemporaryDirectory(prefix="calib.") as d:
        exposed = Path(d) / "exposed.onnx"
        onnx.save(model, str(exposed))
        sess = _session(exposed)
        out_names = [o.name for o in sess.get_outputs()]
        observers = {n: RangeObserver() for n in names}
        input_name = sess.get_inputs()[0].name
        for xb in _batches(calib, batch_size):
            feeds = {input_name: xb}
            for name, value in zip(out_names, sess.run(None, feeds), strict=True):
                if name in observers:
                    observers[name].observe(torch.from_numpy(np.asarray(value)))
            observers[input_name].observe(torch.from_numpy(xb))
    return {n: o.range(method, bits=8, signed=False, percentile=percentile) for n, o in observers.items()}


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over one batch: its calibrator must run, but every
    range it finds is overridden."""

    def __init__(self, input_name: str, x: np.ndarray):
        self._it = iter([{input_name: x}])

    def get_next(self):
        return next(self._it, None)


def quantize_onnx_int8(
    fp32_onnx: Path,
    out: Path,
    calib: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    *,
    percentile: float = 99.99,
    batch_size: int = 64,
    reduce_range: bool | None = None,
    float_stem: bool = True,
) -> dict[str, Any]:
    """Write a QDQ int8 copy of fp32_onnx to out (atomically) with a sidecar meta; returns the meta.

    calib: float32 NCHW calibration images. reduce_range: 7-bit weights; None picks it for this CPU
    (cpu_needs_reduce_range). float_stem: leave the convolutions that read the graph input in fp32
    (stem_convs; see the module docstring for why). A previous `out` and its meta are removed first, so
    a failed call leaves none. The meta records the sha256, file sizes, the integer kernels ONNX Runtime
    runs, the nodes left in fp32, and the top-1 agreement with the fp32 model on calib.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    calib = np.asarray(calib, dtype=np.float32)
    if calib.ndim == 0 or len(calib) == 0:
        raise ValueError("quantize_onnx_int8 needs at least one calibration image")
    if reduce_range is None:
        reduce_range = cpu_needs_reduce_range()
    out.unlink(missing_ok=True)
    meta_path(out).unlink(missing_ok=True)
    fp32 = load_onnx(fp32_onnx, threads=1)  # ArtifactError when missing, corrupt or not matching its meta
    fp32_logits = np.concatenate([fp32.run(xb) for xb in _batches(calib, batch_size)])  # checks the shape

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tempfile.TemporaryDirectory(prefix="int8.") as d:
            pre = Path(d) / "pre.onnx"
            quant_pre_process(str(fp32_onnx), str(pre))
            kept_float = _name_nodes(pre, float_stem=float_stem)
            ranges = activation_ranges(pre, calib, method, percentile=percentile, batch_size=batch_size)
            input_name = onnx.load(str(pre)).graph.input[0].name
            overrides = {n: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for n, (lo, hi) in ranges.items()}
            # The quantizer logs advice (pre-processing, per-channel speed) on the root logger.
            with _quiet_logging(), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(pre),
                    str(tmp),
                    _Reader(input_name, calib[:batch_size]),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    nodes_to_exclude=kept_float,
                    # A Linear's output is float in PyTorch: the logits, and in a transformer the input of a
                    # float bias add, GELU or LayerNorm. Rounding it to 8 bits (the quantizer's default)
                    # put ties into the logits' argmax. Convs keep theirs: QLinearConv needs it.
                    extra_options={"TensorQuantOverrides": overrides,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
                )
        strip_metadata(tmp)
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
        int8_ops = int8_kernel_ops(tmp)
        if not int8_ops:
            raise StageError(f"the int8 model quantized from {fp32_onnx} runs no integer kernel in ONNX Runtime "
                             f"(optimized ops: {dict(optimized_op_types(tmp))}); this ONNX Runtime build "
                             "cannot run it in int8")
        int8 = load_onnx(tmp, threads=1, verify=False)
        int8_logits = np.concatenate([int8.run(xb) for xb in _batches(calib, batch_size)])
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    agreement = float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean())
    meta = {
        "engine": "onnxruntime",
        "format": "QDQ",
        "file": out.name,
        "source": fp32_onnx.name,
        "sha256": sha256_file(out),
        "file_bytes": out.stat().st_size,
        "fp32_file_bytes": fp32_onnx.stat().st_size,
        "input_name": input_name,
        "input_shape": list(fp32.input_shape),
        "input_dtype": "float32",
        "activation_type": "uint8 per tensor (asymmetric)",
        "weight_type": f"int8 {'per channel' if per_channel else 'per tensor'} (symmetric)",
        "reduce_range": reduce_range,
        "weight_levels": "-64..64 (7-bit, reduce_range)" if reduce_range else "-127..127",
        "calibration": method,
        "percentile": percentile if method == "percentile" else None,
        "calib_images": len(calib),
        "tensors_calibrated": len(ranges),
        "int8_ops": int8_ops,
        "float_nodes": kept_float,
        "top1_agreement": agreement,
        "max_abs_diff_logits": float(np.abs(int8_logits - fp32_logits).max()),
    }
    _write_json_atomic(meta_path(out), meta)
    return meta


def float_nodes(model: Any, *, float_stem: bool = True) -> list[str]:
    """Names of the nodes of an onnx ModelProto, among QUANTIZED_OPS, that stay float: what the PyTorch
    simulation (compression_ops.quantize) does not quantize either.

    * MatMuls without a constant operand: attention's q @ k^T and attn @ v (activation x activation);
    * Adds other than a convnet's residual add (both operands from convs, ReLUs or residual adds): bias
      and position-embedding adds and a transformer's residual stream, which feeds a LayerNorm;
    * the stem convs when float_stem (see the module docstring).
    """
    g = model.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in g.node for o in n.output}
    keep: list[str] = stem_convs(model) if float_stem else []
    residual: set[str] = set()  # Add outputs that are convnet residuals (so a later residual add chains)
    for n in g.node:  # topological order: a residual add's operands were visited before it
        if n.op_type == "MatMul" and not any(i in consts for i in n.input):
            keep.append(n.name)
        elif n.op_type == "Add":
            ops = [producer.get(i) for i in n.input]
            if all(p is not None and (p.op_type in ("Conv", "Relu", "Clip") or p.output[0] in residual) for p in ops):
                residual.add(n.output[0])
            else:
                keep.append(n.name)
    return keep


def stem_convs(model: Any) -> list[str]:
    """Names of the Conv nodes of an onnx ModelProto that read a graph input directly (the stem)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = {i.name for i in g.input if i.name not in inits}
    return [n.name for n in g.node if n.op_type == "Conv" and n.input and n.input[0] in inputs]


def _name_nodes(path: Path, *, float_stem: bool = True) -> list[str]:
    """Give every unnamed node of the model at path a unique name (the quantizer excludes nodes by name),
    saving it in place when one was missing; returns float_nodes of the result."""
    import onnx

    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    renamed = False
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name, renamed = name, True
            taken.add(name)
    if renamed:
        onnx.save(model, str(path))
    return float_nodes(model, float_stem=float_stem)


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ engine adapter (tasks/engines/__init__.py)


def build(job: BuildJob) -> dict[str, Any]:
    """The fp32 export of the same model (the onnxruntime engine's artifact, exported here when that
    engine is not built) quantized to int8 with the plan's calibration."""
    from tasks.engines import onnx_runtime

    if job.calibration is None:
        raise StageError("onnxruntime_int8 needs calibration images (BuildJob.calibration)")
    fp32 = job.artifact_of("onnxruntime")
    if not fp32.is_file():
        fp32 = job.out.with_name(job.out.stem + ".fp32.onnx")
        onnx_runtime.build(dataclasses.replace(job, out=fp32))
    try:
        return quantize_onnx_int8(fp32, job.out, job.calibration(), method=job.calibration_method)
    finally:
        if fp32.name.endswith(".fp32.onnx"):
            fp32.unlink(missing_ok=True)
            meta_path(fp32).unlink(missing_ok=True)


read_meta = onnx_read_meta
load = onnx_load


def describe(meta: dict[str, Any]) -> str:
    return (f"QDQ, {meta['calibration']} calibration, {meta['file_bytes'] / 1e3:.1f} kB, "
            f"top-1 agreement with fp32 {meta['top1_agreement']:.3f}")
