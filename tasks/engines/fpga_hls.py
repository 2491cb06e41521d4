"""FPGA flow: an int8 (or QAT) model as an hls4ml HLS project, run by its bit-accurate C simulation.

    meta = build_hls(quantized_model, example, out_dir)    # HLS C++ project + compiled C simulation
    runner = load_hls(out_dir)                              # runner.run(x_nchw_float32) -> logits
    agreement(runner, quantized_model, x, y)                # top-1 agreement and both accuracies
    estimate_resources(out_dir)                             # analytic DSP/BRAM/latency estimate

What is real and what is not. The HLS C++ (firmware/) is what hls4ml (PyTorch frontend, Vitis
backend) writes for the model; the C simulation compiles that same C++ with the system g++ and
Xilinx's arbitrary-precision types (ap_fixed), so its outputs are bit-for-bit what the synthesised
hardware computes. Synthesis, place-and-route and a bitstream need AMD's vendor tools (Vitis HLS,
Vivado), which are not installed here: `build_hls` never runs them, and the resource and latency
figures of `estimate_resources` are analytic estimates, not synthesis reports. To synthesise, copy
out_dir to a machine with Vitis HLS and run `vitis_hls -f build_prj.tcl` (or hls4ml's
`hls_model.build()`).

How our quantization becomes fixed point (the model must hold fake-quant layers, the output of
compression_ops.quantize's quantize_int8 or qat):
  * every Conv2d/Linear becomes three hls4ml layers: a quantizer (BatchNorm with scale 1/s_act whose
    output type is ap_ufixed<b,b,AP_RND_CONV,AP_SAT>: round half to even and clamp to 0..2^b-1, as
    torch.fake_quantize does), the conv/dense on integer codes (weights are our int8/QAT codes held
    exactly as ap_fixed<w,w>, accumulators wide enough never to round or overflow), and a rescale
    (BatchNorm, per output channel: s_act * s_weight[c], plus the float bias, and any BatchNorm the
    PyTorch model kept, folded in);
  * the network input is quantized on the host exactly as torch does it (scale, zero point) and
    enters the FPGA as the integer codes q - zero_point, channels last;
  * real-valued tensors between layers (rescaled outputs, residual adds, ReLU, pooling) get
    ap_fixed types with integer bits from a worst-case bound propagated from the codes (so no
    overflow is possible) and `data_frac_bits` fractional bits (default: `guard_bits` = 12 bits finer
    than the finest activation step), rounded to nearest (AP_RND);
  * AdaptiveAvgPool2d becomes the equivalent AvgPool2d (hls4ml's PyTorch frontend has no adaptive
    pooling), nn.Identity (left by BatchNorm folding) and Dropout are dropped, and a quantizer that
    would follow a flatten is moved before it (per-tensor, so equivalent; hls4ml 1.3's io_stream
    code mis-sizes a BatchNorm placed right after the transpose it inserts before a flatten).
The inexact steps are the quantizer and rescale constants (`scale_bits` significant bits, 18: one
DSP48 operand) and the rounding of real-valued tensors to `data_frac_bits`: the C simulation differs
from the PyTorch simulation only where a value lies within ~2^-11 activation steps of a rounding
boundary, which flips that activation by one step. Measured on digits (ResNet-8 width 8, int8):
top-1 agreement 100 %, logits differ (by <= 0.12) on ~14 % of the images; scale_bits=24 and
guard_bits=16 make the C simulation match the float64 emulation on all but 1 of 359 images, at two
DSP48 per rescale multiplier.

Not supported by hls4ml's PyTorch frontend (1.3): grouped/depthwise convolutions (mobilenet_tiny),
ReLU6, and anything else outside hls4ml.converters.pytorch_to_hls.get_supported_pytorch_layers();
build_hls names the layer and raises StageError.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.engines.base import check_input, sha256_file
from tasks.errors import ArtifactError, StageError

META_FILE = "meta.json"
FORMAT = 1
PROJECT = "shrinkflow_fpga"
SYNTHESIS_NOTE = (
    "Synthesis, place-and-route and bitstream generation need AMD vendor tools (Vitis HLS / Vivado), "
    "which are not installed here and were not run. Resource and latency figures are analytic "
    "estimates, not synthesis reports; run `vitis_hls -f build_prj.tcl` in the project on a machine "
    "with Vitis HLS for real ones."
)
# Requirement line for pyproject.toml (the PyTorch frontend needs neither TensorFlow nor Keras).
REQUIREMENT = "hls4ml>=1.3,<1.4"
# Default FPGA part: AMD Zynq UltraScale+ ZU7EV (ZCU104 board): 1728 DSP, 312 BRAM36, 230k LUT.
DEFAULT_PART = "xczu7ev-ffvc1156-2-e"
PART_RESOURCES = {  # for the "fits?" column of the estimate; from AMD's product tables
    "xczu7ev-ffvc1156-2-e": {"DSP": 1728, "BRAM18": 624, "LUT": 230400, "FF": 460800},
    "xcvu13p-flga2577-2-e": {"DSP": 12288, "BRAM18": 5376, "LUT": 1728000, "FF": 3456000},
    "xc7z020clg400-1": {"DSP": 220, "BRAM18": 280, "LUT": 53200, "FF": 106400},
}


# --------------------------------------------------------------------------- quantization -> layers


@dataclasses.dataclass
class _QLayer:
    """One fake-quant Conv2d/Linear in integer form."""

    name: str
    kind: str  # "conv" | "linear"
    codes: np.ndarray  # integer weight codes, the layer's weight shape
    weight_bits: int
    act_scale: float  # float32 value torch uses
    act_zp: int
    act_bits: int
    out_scale: np.ndarray  # per output channel: act_scale * weight_scale (* folded BN factor)
    out_bias: np.ndarray  # per output channel
    module: Any  # the plain torch module (geometry)


def _qlayer(name: str, m: Any) -> _QLayer:
    import torch
    from torch import nn

    from compression_ops.quant_ranges import qparams, qrange, weight_scales

    with torch.no_grad():
        w_scale = (weight_scales(m.weight, m.weight_bits) * m.weight_clip).float()
        qw = m.quant_weight().float()  # exactly what forward() uses
        shape = (-1,) + (1,) * (qw.dim() - 1)
        qmax = qrange(m.weight_bits, signed=True)[1]
        codes = torch.round(qw / w_scale.view(shape)).clamp(-qmax, qmax)
        if not m.calibrated:
            raise StageError(f"layer {name!r} has no calibrated activation range: run calibration "
                             "(quantize_int8 or qat) before build_hls")
        s, zp = qparams(m.act_lo, m.act_hi, m.act_bits, signed=False)
        s32 = float(s.float())
        bias = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(m.weight.shape[0])
    plain = m.to_plain()
    return _QLayer(
        name=name,
        kind="conv" if isinstance(plain, nn.Conv2d) else "linear",
        codes=codes.numpy().astype(np.int64),
        weight_bits=int(m.weight_bits),
        act_scale=s32,
        act_zp=int(zp),
        act_bits=int(m.act_bits),
        out_scale=s32 * w_scale.double().numpy(),
        out_bias=bias.copy(),
        module=plain,
    )


def _set_module(root: Any, name: str, new: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _bn(scale: np.ndarray, bias: np.ndarray, dims: int) -> Any:
    """A BatchNorm computing x * scale + bias exactly as hls4ml reads it (eps 0, mean 0, var 1)."""
    import torch
    from torch import nn

    n = len(scale)
    bn = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(n, eps=0.0)
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(scale, dtype=torch.float32))
        bn.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    return bn.eval()


@dataclasses.dataclass
class _Prepared:
    model: Any  # the HLS-ready torch module (what hls4ml converts)
    qlayers: dict[str, _QLayer]
    roles: dict[str, tuple]  # module name in the ready model -> role tuple
    input_quant: dict[str, Any]
    input_shape: tuple[int, ...]  # (C, H, W) or (F,)
    num_outputs: int
    changes: list[str]


def _trace(model: Any):
    from hls4ml.utils.torch import CustomFXTracer

    return CustomFXTracer().trace(model)


_PASS_THROUGH = ("Identity", "Dropout", "Dropout2d", "Dropout1d")


def _is_flatten(node: Any, modules: dict[str, Any]) -> bool:
    import torch
    from torch import nn

    if node.op == "call_function":
        return node.target is torch.flatten
    if node.op == "call_method":
        return node.target == "flatten"
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Flatten)


def prepare_for_hls(model: Any, example: Any) -> _Prepared:
    """The HLS-ready copy of a fake-quant model, as a torch.fx GraphModule hls4ml can convert: per
    quantized layer a quantizer (shared by layers reading the same tensor), the conv/linear on integer
    codes and a per-channel rescale; BatchNorms folded; AdaptiveAvgPool2d as AvgPool2d; Identity and
    Dropout removed. `model` is not modified."""
    import torch
    from torch import nn
    from torch.fx.passes.shape_prop import ShapeProp

    from compression_ops.quantize import QUANT_LAYERS, _conv_bn_pairs

    qm = copy.deepcopy(model).eval().float().cpu()
    example = torch.as_tensor(example).detach().float().cpu()
    if example.dim() in (1, 3):
        example = example.unsqueeze(0)
    example = example[:1]
    quant = [(n, m) for n, m in qm.named_modules() if isinstance(m, QUANT_LAYERS)]
    if not quant:
        raise StageError(
            f"build_hls needs a quantized model, and {type(model).__name__} has no fake-quant layer: apply "
            "compression_ops.quantize's quantize_int8 (or qat) first; its Conv2d/Linear scales and "
            "activation ranges define the fixed-point types"
        )
    float_layers = [n for n, m in qm.named_modules()
                    if isinstance(m, nn.Conv2d | nn.Linear) and not isinstance(m, QUANT_LAYERS)]
    if float_layers:
        raise StageError(f"layers {float_layers} are not quantized; quantize every Conv2d/Linear "
                         "(quantize_int8 does) before build_hls")
    changes: list[str] = []
    qlayers: dict[str, _QLayer] = {}
    for name, m in quant:
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise StageError(
                f"layer {name!r}: hls4ml's PyTorch frontend supports only groups=1 convolutions with zero "
                f"padding (got groups={m.groups}, padding_mode={m.padding_mode!r}); depthwise models such "
                "as mobilenet_tiny cannot be converted"
            )
        q = _qlayer(name, m)
        qlayers[name] = q
        _set_module(qm, name, q.module)

    # BatchNorms the model kept (QAT keeps them) fold into the rescale: the codes stay exact.
    for conv_name, bn_name in _conv_bn_pairs(qm):
        if conv_name not in qlayers:
            continue
        bn = qm.get_submodule(bn_name)
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        a = (bn.running_var.double() + bn.eps).rsqrt()
        if bn.affine:
            a = a * bn.weight.detach().double()
        shift = bn.bias.detach().double() if bn.affine else torch.zeros_like(a)
        q = qlayers[conv_name]
        a_np, mean = a.numpy(), bn.running_mean.double().numpy()
        q.out_scale = q.out_scale * a_np
        q.out_bias = (q.out_bias - mean) * a_np + shift.numpy()
        _set_module(qm, bn_name, nn.Identity())
        changes.append(f"{bn_name}: BatchNorm folded into the rescale of {conv_name}")

    try:
        gm = torch.fx.GraphModule(qm, _trace(qm))
    except Exception as e:
        raise StageError(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); hls4ml's "
                         "PyTorch frontend needs an fx-traceable model (no data-dependent control flow)") from e
    graph = gm.graph
    ShapeProp(gm).propagate(example)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in graph.nodes
              if hasattr(n.meta.get("tensor_meta"), "shape")}  # single-tensor nodes
    modules = dict(gm.named_modules())
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_shape = shapes.get(out_node.args[0].name) if isinstance(out_node.args[0], torch.fx.Node) else None
    if out_shape is None or len(out_shape) != 2:
        raise StageError(f"build_hls needs a model returning (batch, classes) logits, got {out_shape}")

    # Drop pass-through modules, make adaptive pooling a fixed window.
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if type(m).__name__ in _PASS_THROUGH:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            h, w = shapes[node.args[0].name][-2:]
            oh, ow = (m.output_size, m.output_size) if isinstance(m.output_size, int) else m.output_size
            oh, ow = oh or h, ow or w
            if h % oh or w % ow:
                raise StageError(f"{node.target}: AdaptiveAvgPool2d from {h}x{w} to {oh}x{ow} is not a fixed-window "
                                 "pooling; hls4ml cannot express it")
            _set_module(gm, node.target, nn.AvgPool2d((h // oh, w // ow), (h // oh, w // ow)))
            changes.append(f"{node.target}: AdaptiveAvgPool2d({m.output_size}) -> AvgPool2d({h // oh}x{w // ow}), "
                           f"exact for its {h}x{w} input")

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise StageError(f"build_hls supports single-input models, this one has {len(placeholders)} inputs")
    users = list(placeholders[0].users)
    bad = [u.format_node() for u in users if not (u.op == "call_module" and u.target in qlayers)]
    if bad:
        raise StageError(
            "the model input must feed only quantized Conv2d/Linear layers (their input quantizer runs on "
            f"the host); here it also feeds: {bad}"
        )
    first = [qlayers[u.target] for u in users]
    params = {(q.act_scale, q.act_zp, q.act_bits) for q in first}
    if len(params) != 1:
        raise StageError(f"layers {[q.name for q in first]} read the model input with different activation "
                         f"quantization {sorted(params)}; calibrate them on the same tensor")
    s_in, zp_in, b_in = params.pop()
    input_quant = {"scale": s_in, "zero_point": zp_in, "bits": b_in}

    roles: dict[str, tuple] = {}
    used: set[str] = set(dict(gm.named_modules()))

    def add(base: str, mod: Any, role: tuple) -> str:
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        gm.add_submodule(name, mod)
        roles[name] = role
        return name

    quantizers: dict[tuple, Any] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in qlayers:
            continue
        q = qlayers[node.target]
        base = node.target.replace(".", "_")
        dims = 4 if q.kind == "conv" else 2
        core = (nn.Conv2d(q.module.in_channels, q.module.out_channels, q.module.kernel_size, q.module.stride,
                          q.module.padding, q.module.dilation, 1, bias=False) if q.kind == "conv"
                else nn.Linear(q.module.in_features, q.module.out_features, bias=False))
        with torch.no_grad():
            core.weight.copy_(torch.from_numpy(q.codes.astype(np.float32)))
        _set_module(gm, node.target, core.eval())
        roles[node.target] = ("codes", q)
        rescale = add(f"{base}_rescale", _bn(q.out_scale, q.out_bias, dims), ("rescale", q))
        with graph.inserting_after(node):
            r = graph.call_module(rescale, (node,))
        node.replace_all_uses_with(r, delete_user_cb=lambda u, r=r: u is not r)
        src = node.args[0]
        if src.op == "placeholder":
            continue  # quantized on the host
        # A quantizer is per tensor: put it before a flatten (hls4ml mishandles a batch norm right after
        # the transpose it inserts before a flatten), and share it between layers reading one tensor.
        where = src
        if _is_flatten(src, dict(gm.named_modules())) and len(src.users) == 1:
            where = src.args[0]
        key = (where.name, q.act_scale, q.act_zp, q.act_bits)
        if key not in quantizers:
            c = shapes[where.name][1]
            qd = len(shapes[where.name])
            chain = [(_bn(np.full(c, 1.0 / q.act_scale), np.zeros(c), qd), ("quantize", q.act_bits, q.act_zp, q.act_scale))]
            if q.act_zp != 0:  # torch: round(x / s), + zero point, clamp to 0..2^b-1, - zero point
                chain += [(_bn(np.ones(c), np.full(c, float(q.act_zp)), qd), ("shift", q.act_bits, q.act_zp)),
                          (nn.ReLU(), ("clamp", q.act_bits, q.act_zp)),
                          (_bn(np.ones(c), np.full(c, float(-q.act_zp)), qd), ("unshift", q.act_bits, q.act_zp))]
            prev = where
            for i, (mod, role) in enumerate(chain):
                name = add(f"{base}_quant" + (f"{i}" if i else ""), mod, role)
                with graph.inserting_after(prev):
                    prev = graph.call_module(name, (prev,))
            quantizers[key] = prev
        qnode = quantizers[key]
        if where is src:
            node.replace_input_with(src, qnode)
        else:
            src.replace_input_with(where, qnode)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return _Prepared(gm.eval(), qlayers, roles, input_quant, tuple(example.shape[1:]), int(out_shape[1]), changes)


def emulate(prep: _Prepared, x: Any) -> np.ndarray:
    """The HLS-ready model run in float64 PyTorch with the quantizers rounding and clamping as the
    fixed-point types do: a check of the rewrite that needs no C++ (inputs: float NCHW)."""
    import torch

    gm = copy.deepcopy(prep.model).double()
    hooks = []
    for name, role in prep.roles.items():
        if role[0] in ("quantize", "clamp"):
            qmax = 2 ** role[1] - 1

            def hook(mod, inp, out, kind=role[0], qmax=qmax, zp=role[2]):
                if kind == "quantize":
                    out = torch.round(out)  # half to even, as AP_RND_CONV
                    return out.clamp(0, qmax) if zp == 0 else out
                return out.clamp(0, qmax)

            hooks.append(gm.get_submodule(name).register_forward_hook(hook))
    try:
        codes = quantize_input(np.asarray(x, dtype=np.float32), prep.input_quant)
        with torch.no_grad():
            return gm(torch.from_numpy(codes)).numpy()
    finally:
        for h in hooks:
            h.remove()


# --------------------------------------------------------------------------- host-side quantization


def quantize_input(x: np.ndarray, q: dict[str, Any]) -> np.ndarray:
    """Integer codes (q - zero_point) of float input x, as torch.fake_quantize_per_tensor_affine makes
    them: round half to even of x * (1/scale) in float32, + zero point, clamped to 0..2^bits-1."""
    s = np.float32(q["scale"])
    inv = np.float32(1.0) / s
    qmax = 2 ** int(q["bits"]) - 1
    zp = int(q["zero_point"])
    codes = np.rint(np.asarray(x, dtype=np.float32) * inv).astype(np.float64) + zp
    return np.clip(codes, 0, qmax) - zp


# --------------------------------------------------------------------------- precision choice


def _affine_bounds(scale: Any, bias: Any, lo: Any, hi: Any) -> tuple[float, float]:
    """The range of scale * x + bias (per channel) for x in [lo, hi], over all channels."""
    ylo = np.minimum(scale * lo, scale * hi) + bias
    yhi = np.maximum(scale * lo, scale * hi) + bias
    return float(ylo.min()), float(yhi.max())


def _int_bits_signed(lo: float, hi: float) -> int:
    """Smallest I with [lo, hi] inside [-2^(I-1), 2^(I-1)) (hi strictly below the top)."""
    i = 1
    while not (-(2.0 ** (i - 1)) <= lo and hi < 2.0 ** (i - 1)):
        i += 1
    return i


def _int_bits_unsigned(hi: float) -> int:
    i = 0
    while hi >= 2.0**i:
        i += 1
    return max(i, 1)


def _fixed(lo: float, hi: float, frac: int, extra: str = "") -> str:
    if lo >= 0:
        i = _int_bits_unsigned(hi)
        return f"ap_ufixed<{i + frac},{i}{extra}>"
    i = _int_bits_signed(lo, hi)
    return f"ap_fixed<{i + frac},{i}{extra}>"


def _int_type(lo: int, hi: int) -> str:
    if lo >= 0:
        i = _int_bits_unsigned(hi)
        return f"ap_ufixed<{i},{i}>"
    i = _int_bits_signed(lo, hi)
    return f"ap_fixed<{i},{i}>"


def _const_type(values: np.ndarray, bits: int, extra: str = "") -> str:
    """Type for constants (scales): `bits` significant bits below the largest magnitude."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    top = float(v.max()) if v.size else 0.0
    if top == 0.0:
        return "ap_fixed<2,2>"
    i = math.floor(math.log2(top)) + 1  # top < 2^i
    signed = bool((np.asarray(values) < 0).any())
    if signed:
        return f"ap_fixed<{bits + 1},{i + 1}{extra}>"
    return f"ap_ufixed<{bits},{i}{extra}>"


def _bias_type(values: np.ndarray, frac: int, extra: str = "") -> str:
    v = np.asarray(values, dtype=np.float64)
    if not v.size or not np.any(v):
        return "ap_fixed<2,2>"
    return _fixed(float(v.min()), float(v.max()), frac, extra)


def _choose_precisions(prep: _Prepared, data_frac_bits: int | None, scale_bits: int, guard_bits: int,
                       rounding: bool = True):
    """Per hls4ml layer name: precisions, from a worst-case interval bound propagated from the codes.
    rounding: real-valued tensors and constants round to nearest (AP_RND) instead of truncating."""
    rnd = ",AP_RND" if rounding else ""

    def fx(lo: float, hi: float, frac: int) -> str:
        return _fixed(lo, hi, frac, rnd)

    def cx(values: np.ndarray, bits: int) -> str:
        return _const_type(values, bits, rnd)

    def bx(values: np.ndarray, frac: int) -> str:
        return _bias_type(values, frac, rnd)

    from torch import nn

    inner = [r[3] for r in prep.roles.values() if r[0] == "quantize"]
    finest = min(inner or [prep.input_quant["scale"]])
    frac = data_frac_bits if data_frac_bits is not None else max(0, math.ceil(-math.log2(finest))) + guard_bits
    gm = _trace(prep.model)
    modules = dict(prep.model.named_modules())
    bounds: dict[str, tuple[float, float]] = {}
    prec: dict[str, dict[str, str]] = {}
    info: dict[str, dict[str, Any]] = {}
    iq = prep.input_quant
    qmax_in = 2 ** iq["bits"] - 1

    def arg_bound(a) -> tuple[float, float]:
        return bounds[a.name]

    for node in gm.nodes:
        if node.op == "placeholder":
            lo, hi = float(-iq["zero_point"]), float(qmax_in - iq["zero_point"])
            bounds[node.name] = (lo, hi)
            prec[node.name] = {"result": _int_type(int(lo), int(hi))}
            info[node.name] = {"role": "input codes (q - zero_point), quantized on the host"}
            continue
        if node.op == "output":
            continue
        ins = node.all_input_nodes
        if node.op == "call_module":
            m = modules[node.target]
            role = prep.roles.get(node.target)
            lo, hi = arg_bound(ins[0])
            if role and role[0] == "quantize":
                bits = role[1]
                qm = 2**bits - 1
                s = np.asarray(m.weight.detach().double().numpy())
                prec[node.name] = {"scale": cx(s, scale_bits), "bias": "ap_fixed<2,2>"}
                if role[2] == 0:
                    bounds[node.name] = (0.0, float(qm))
                    prec[node.name]["result"] = f"ap_ufixed<{bits},{bits},AP_RND_CONV,AP_SAT>"
                    info[node.name] = {"role": f"quantizer: x / s_act rounded half to even, clamped to 0..{qm}"}
                else:  # round(x / s) only (saturating 2 bits wider); shift, clamp and unshift follow
                    i = bits + 2
                    bounds[node.name] = (-(2.0 ** (i - 1)), 2.0 ** (i - 1) - 1)
                    prec[node.name]["result"] = f"ap_fixed<{i},{i},AP_RND_CONV,AP_SAT>"
                    info[node.name] = {"role": "quantizer: x / s_act rounded half to even"}
            elif role and role[0] == "shift":
                zp = role[2]
                lo2, hi2 = lo + zp, hi + zp
                bounds[node.name] = (lo2, hi2)
                prec[node.name] = {"result": _int_type(int(lo2), int(hi2)), "scale": "ap_ufixed<1,1>",
                                   "bias": _int_type(min(zp, 0), max(zp, 0))}
                info[node.name] = {"role": "quantizer: + zero point"}
            elif role and role[0] == "clamp":
                bits = role[1]
                bounds[node.name] = (0.0, float(2**bits - 1))
                prec[node.name] = {"result": f"ap_ufixed<{bits},{bits},AP_TRN,AP_SAT>"}
                info[node.name] = {"role": f"quantizer: clamp to 0..{2**bits - 1}"}
            elif role and role[0] == "unshift":
                zp = role[2]
                lo2, hi2 = lo - zp, hi - zp
                bounds[node.name] = (lo2, hi2)
                prec[node.name] = {"result": _int_type(int(lo2), int(hi2)), "scale": "ap_ufixed<1,1>",
                                   "bias": _int_type(min(-zp, 0), max(-zp, 0))}
                info[node.name] = {"role": "quantizer: - zero point"}
            elif role and role[0] == "codes":
                q: _QLayer = role[1]
                w = q.codes.reshape(q.codes.shape[0], -1).astype(np.float64)
                amax = (np.maximum(w * lo, w * hi)).sum(1)
                amin = (np.minimum(w * lo, w * hi)).sum(1)
                alo, ahi = int(min(amin.min(), 0)), int(max(amax.max(), 0))
                acc = _int_type(alo, ahi)
                if acc.startswith("ap_ufixed"):  # keep accumulators signed
                    i = _int_bits_unsigned(ahi) + 1
                    acc = f"ap_fixed<{i},{i}>"
                wb = q.weight_bits
                bounds[node.name] = (float(alo), float(ahi))
                prec[node.name] = {"weight": f"ap_fixed<{wb},{wb}>", "bias": "ap_fixed<2,2>",
                                   "accum": acc, "result": acc}
                info[node.name] = {"role": f"{q.kind} on integer codes of {q.name}", "weight_bits": wb,
                                   "accumulator": acc, "source": q.name}
                bounds[node.name + ":per_channel"] = (amin, amax)  # type: ignore[assignment]
            elif role and role[0] == "rescale":
                q = role[1]
                src = ins[0].name
                amin, amax = bounds[src + ":per_channel"]  # type: ignore[misc]
                s = q.out_scale
                b = q.out_bias
                lo2, hi2 = bounds[node.name] = _affine_bounds(s, b, amin, amax)
                prec[node.name] = {"result": fx(lo2, hi2, frac), "scale": cx(s, scale_bits),
                                   "bias": bx(b, frac + 2)}
                info[node.name] = {"role": f"rescale of {q.name}: s_act * s_weight[c] (+ bias)", "source": q.name}
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                a = (m.running_var.double() + m.eps).rsqrt()
                if m.affine:
                    a = a * m.weight.detach().double()
                c = (m.bias.detach().double() if m.affine else 0) - m.running_mean.double() * a
                a, c = a.numpy(), np.asarray(c)
                lo2, hi2 = bounds[node.name] = _affine_bounds(a, c, lo, hi)
                prec[node.name] = {"result": fx(lo2, hi2, frac), "scale": cx(a, scale_bits),
                                   "bias": bx(c, frac + 2)}
                info[node.name] = {"role": "batch norm (unfolded)"}
            elif isinstance(m, nn.ReLU):
                bounds[node.name] = (max(lo, 0.0), max(hi, 0.0))
                prec[node.name] = {"result": fx(0.0, max(hi, 0.0), frac)}
                info[node.name] = {"role": "relu"}
            elif type(m).__name__ in ("Sigmoid", "Tanh", "LeakyReLU", "ELU", "PReLU", "Threshold", "Softmax"):
                # bounded by [-1, 1] or by the input (leaky/elu): the hull of both
                lo2, hi2 = min(lo, -1.0), max(hi, 1.0)
                bounds[node.name] = (lo2, hi2)
                prec[node.name] = {"result": fx(lo2, hi2, frac)}
                info[node.name] = {"role": type(m).__name__}
            elif isinstance(m, nn.AvgPool2d | nn.MaxPool2d):
                bounds[node.name] = (lo, hi)
                k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
                n = k[0] * k[1]
                # the sum of the window in accum, then / n
                acc = fx(n * lo, n * hi, frac + 4)
                prec[node.name] = {"result": fx(lo, hi, frac), "accum": acc}
                info[node.name] = {"role": type(m).__name__}
            elif isinstance(m, nn.Flatten | nn.Dropout | nn.Sequential):
                bounds[node.name] = (lo, hi)
                prec[node.name] = {"result": fx(lo, hi, frac)}
            else:
                bounds[node.name] = (lo, hi)  # hls4ml will refuse it if it cannot convert it
        elif node.op in ("call_function", "call_method"):
            lo2, hi2, role_name = _function_bound(node, [bounds[a.name] for a in ins])
            bounds[node.name] = (lo2, hi2)
            prec[node.name] = {"result": fx(lo2, hi2, frac)}
            info[node.name] = {"role": role_name}
    for k in [k for k in bounds if k.endswith(":per_channel")]:
        del bounds[k]
    return prec, info, bounds, frac


_SHAPE_OPS = ("flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose", "contiguous",
              "getitem", "dropout")


def _function_bound(node: Any, bl: list[tuple[float, float]]) -> tuple[float, float, str]:
    """Worst-case (lo, hi) of a call_function / call_method node from its inputs' bounds."""
    import operator

    import torch

    fn = node.target
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))
    consts = [float(a) for a in node.args if isinstance(a, int | float) and not isinstance(a, bool)]
    bl = bl + [(c, c) for c in consts] if name not in _SHAPE_OPS else bl
    if not bl:
        return 0.0, 0.0, name
    if fn in (operator.add, torch.add) or name in ("add", "__add__", "iadd"):
        return sum(b[0] for b in bl), sum(b[1] for b in bl), "add"
    if fn in (operator.sub, torch.sub) or name in ("sub", "__sub__", "subtract"):
        return bl[0][0] - sum(b[1] for b in bl[1:]), bl[0][1] - sum(b[0] for b in bl[1:]), "subtract"
    if fn in (operator.mul, torch.mul) or name in ("mul", "__mul__", "multiply"):
        lo, hi = bl[0]
        for a, b in bl[1:]:
            p = (lo * a, lo * b, hi * a, hi * b)
            lo, hi = min(p), max(p)
        return lo, hi, "multiply"
    if name in ("relu",):
        return max(bl[0][0], 0.0), max(bl[0][1], 0.0), "relu"
    if name in ("cat", "concat", "concatenate", "maximum", "minimum", "fmax", "fmin", "max", "min"):
        return min(b[0] for b in bl), max(b[1] for b in bl), name
    if name in _SHAPE_OPS or name in ("avg_pool2d", "max_pool2d", "avg_pool1d", "max_pool1d"):
        return bl[0][0], bl[0][1], name
    # other activations (sigmoid, tanh, leaky_relu, elu, ...): within [-1, 1] or the input's range
    return min(bl[0][0], -1.0), max(bl[0][1], 1.0), name


def _auto_reuse(prep: _Prepared, backend: str) -> dict[str, int]:
    """Per conv/dense layer (hls4ml name): the largest valid reuse factor whose out_pixels * RF stays
    within the cycles the largest (padded) image takes to stream in, one pixel per cycle."""
    import torch
    from hls4ml.backends import get_backend
    from torch import nn
    from torch.fx.passes.shape_prop import ShapeProp

    be = get_backend(backend)
    gm = torch.fx.GraphModule(prep.model, _trace(prep.model))
    ShapeProp(gm).propagate(torch.zeros(1, *prep.input_shape))
    modules = dict(gm.named_modules())
    layers = []
    budget = 1
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        shape_in = tuple(node.args[0].meta["tensor_meta"].shape)
        shape_out = tuple(node.meta["tensor_meta"].shape)
        if isinstance(m, nn.Conv2d):
            ph, pw = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            budget = max(budget, (shape_in[2] + 2 * ph) * (shape_in[3] + 2 * pw))
            n_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            layers.append((node.name, n_in, m.out_channels, shape_out[2] * shape_out[3]))
        elif isinstance(m, nn.Linear):
            layers.append((node.name, m.in_features, m.out_features, 1))
        elif isinstance(m, nn.AvgPool2d | nn.MaxPool2d) and len(shape_in) == 4:
            budget = max(budget, shape_in[2] * shape_in[3])
    out = {}
    for name, n_in, n_out, pixels in layers:
        cap = max(1, budget // pixels)
        valid = [rf for rf in range(1, min(cap, n_in * n_out) + 1) if be._validate_reuse_factor(n_in, n_out, rf)]
        out[name] = max(valid) if valid else 1  # hls4ml's own validity rule (FPGABackend)
    return out


# --------------------------------------------------------------------------- build


def _gxx_version() -> str:
    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "missing"


def _hls4ml():
    try:
        import hls4ml
    except ImportError as e:
        raise StageError(f"the FPGA flow needs hls4ml ({e}); install it with `pip install '{REQUIREMENT}'`") from e
    return hls4ml


@contextlib.contextmanager
def _yaml_torch_placeholder():
    """hls4ml dumps its config, the PyTorch model included, to hls4ml_config.yml with yaml.dump, which
    pickles an fx GraphModule and fails; write a short tag for any nn.Module instead, for the duration."""
    import yaml
    from torch import nn

    had = "yaml_multi_representers" in yaml.Dumper.__dict__
    saved = dict(yaml.Dumper.yaml_multi_representers)

    def rep(dumper, m):
        return dumper.represent_scalar("!pytorch_model", f"{type(m).__name__} (not serialised)")

    yaml.add_multi_representer(nn.Module, rep)
    try:
        yield
    finally:
        if had:
            yaml.Dumper.yaml_multi_representers = saved
        else:
            del yaml.Dumper.yaml_multi_representers


def _firmware_digest(prj: Path) -> str:
    """sha256 over the generated HLS sources (firmware/ minus the compiled library), names included."""
    h = hashlib.sha256()
    fw = prj / "firmware"
    for p in sorted(fw.rglob("*")):
        rel = p.relative_to(prj).as_posix()
        if not p.is_file() or p.suffix == ".so" or rel.startswith("firmware/ap_types/"):
            continue
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def build_hls(
    model: Any,
    example: Any,
    out_dir: Path,
    *,
    quant: dict[str, Any] | None = None,
    backend: str = "Vitis",
    io_type: str = "io_stream",
    strategy: str = "Latency",
    reuse_factor: int | str = "auto",
    part: str = DEFAULT_PART,
    clock_period_ns: float = 5.0,
    data_frac_bits: int | None = None,
    guard_bits: int = 12,
    scale_bits: int = 18,
    rounding: bool = True,
    check: tuple[Any, ...] | None = None,
) -> dict[str, Any]:
    """Convert a fake-quant model (quantize_int8 / qat output) into an hls4ml project in out_dir and
    compile its bit-accurate C simulation with the system g++; returns (and writes) meta.json.

    quant: the quantization op's report (OpResult.report), recorded in meta and checked against the
        model's per-layer weight bits; None to take everything from the model's fake-quant layers.
    io_type: "io_stream" (default: line-buffered streaming convolutions, the hls4ml choice for CNNs)
        or "io_parallel" (every tensor in registers; only for tiny inputs).
    reuse_factor: multiplications per multiplier (1 = fully parallel) for every layer, or "auto": per
        conv/dense layer the largest valid one that keeps the layer within the cycles the largest image
        takes to stream through (a balanced dataflow pipeline: same throughput as 1, far fewer
        multipliers in the deep layers). hls4ml moves a value to the nearest valid one per layer; meta
        records what each layer got.
    data_frac_bits: fractional bits of real-valued tensors; None: finest activation step + guard_bits.
    scale_bits: significant bits of the quantizer and rescale constants.
    rounding: real-valued tensors and constants round to nearest (AP_RND; one adder each) rather than
        truncate (AP_TRN, hls4ml's default): half the error and no downward bias.
    check: optional (x, reference_logits) to record the C simulation's top-1 agreement in meta.

    The project is built in a temporary directory beside out_dir and renamed into place at the end, so
    a failure leaves no half project (a previous out_dir is replaced only on success). Synthesis is not
    run: it needs AMD Vitis HLS / Vivado (see SYNTHESIS_NOTE).
    """
    hls4ml = _hls4ml()
    if io_type not in ("io_stream", "io_parallel"):
        raise ValueError(f"io_type={io_type!r}: expected 'io_stream' or 'io_parallel'")
    if strategy not in ("Latency", "Resource"):
        raise ValueError(f"strategy={strategy!r}: expected 'Latency' or 'Resource'")
    if reuse_factor != "auto" and not (isinstance(reuse_factor, int) and reuse_factor >= 1):
        raise ValueError(f"reuse_factor={reuse_factor!r}: expected an integer >= 1 or 'auto'")
    if shutil.which("g++") is None:
        raise StageError("the C simulation needs the system C++ compiler: install g++ (apt-get install g++)")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    prep = prepare_for_hls(model, example)
    if quant is not None:
        _check_quant_report(quant, prep)
    prec, info, bounds, frac = _choose_precisions(prep, data_frac_bits, scale_bits, guard_bits, rounding)

    from hls4ml.converters import convert_from_pytorch_model
    from hls4ml.utils import config_from_pytorch_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _yaml_torch_placeholder():
            try:
                cfg = config_from_pytorch_model(
                    prep.model, prep.input_shape, granularity="name", backend=backend,
                    default_precision="ap_fixed<16,6>",
                    default_reuse_factor=1 if reuse_factor == "auto" else reuse_factor,
                    channels_last_conversion="internal", transpose_outputs=False,
                )
            except Exception as e:  # hls4ml raises bare Exception for unsupported layers
                raise StageError(f"hls4ml's PyTorch frontend cannot convert the model: {e}. Supported layers: "
                                 f"{_supported_layers()}") from e
            cfg["Model"]["Strategy"] = strategy
            layer_cfg = cfg["LayerName"]
            if reuse_factor == "auto":
                for name, rf in _auto_reuse(prep, backend).items():
                    layer_cfg[name]["ReuseFactor"] = rf
            missing = [n for n in layer_cfg if n not in prec]
            if missing:
                raise StageError(f"no precision derived for hls4ml layers {missing}; this model has an operation "
                                 "build_hls does not know how to bound")
            for name, lc in layer_cfg.items():
                p = lc.setdefault("Precision", {})
                for k, v in prec[name].items():
                    if k in p or k == "result":
                        p[k] = v
                for k, v in list(p.items()):
                    if v == "auto":  # only the ones we do not know (e.g. activation tables): harmless
                        p[k] = prec[name].get("result", "ap_fixed<16,6>")
            hls_model = convert_from_pytorch_model(
                prep.model, output_dir=str(tmp), project_name=PROJECT, backend=backend, part=part,
                clock_period=clock_period_ns, io_type=io_type, hls_config=cfg, write_weights_txt=False,
            )
        t_conv = time.perf_counter()
        with contextlib.redirect_stdout(log), _yaml_torch_placeholder():
            try:
                hls_model.compile()
            except Exception as e:
                tail = log.getvalue()[-3000:]
                raise StageError(f"the C simulation did not compile with g++ ({e}); compiler output:\n{tail}") from e
        t_comp = time.perf_counter()
        libs = sorted((tmp / "firmware").glob(f"{PROJECT}-*.so"))
        if len(libs) != 1:
            raise StageError(f"expected one compiled C-simulation library in {tmp / 'firmware'}, found {libs}")
        layers = _layer_table(hls_model, prec, info)
        meta: dict[str, Any] = {
            "engine": "hls4ml",
            "format": FORMAT,
            "hls4ml_version": hls4ml.__version__,
            "backend": backend,
            "part": part,
            "clock_period_ns": clock_period_ns,
            "io_type": io_type,
            "strategy": strategy,
            "reuse_factor": reuse_factor,
            "project_name": PROJECT,
            "library": libs[0].relative_to(tmp).as_posix(),
            "library_sha256": sha256_file(libs[0]),
            "firmware_sha256": _firmware_digest(tmp),
            "compiler": _gxx_version(),
            "input_shape": [None, *prep.input_shape],
            "hls_input_layout": "NHWC" if len(prep.input_shape) == 3 else "NF",
            "input_quant": prep.input_quant,
            "num_outputs": prep.num_outputs,
            "data_frac_bits": frac,
            "scale_bits": scale_bits,
            "rounding": "AP_RND" if rounding else "AP_TRN",
            "precisions": prec,
            "layer_roles": info,
            "bounds": {k: [float(a), float(b)] for k, (a, b) in bounds.items()},
            "layers": layers,
            "model_changes": prep.changes,
            "quant": _jsonable(quant) if quant is not None else None,
            "quantized_layers": {n: {"weight_bits": q.weight_bits, "act_bits": q.act_bits, "act_scale": q.act_scale,
                                     "act_zero_point": q.act_zp} for n, q in prep.qlayers.items()},
            "synthesis": SYNTHESIS_NOTE,
            "convert_seconds": t_conv - t0,
            "compile_seconds": t_comp - t_conv,
        }
        meta["estimate"] = estimate_resources(meta)
        runner = HLSRunner(tmp, meta, verify=False)
        if check is not None:
            x, ref = check
            got = runner.run(np.asarray(x, dtype=np.float32))
            ref = np.asarray(ref)
            meta["check"] = {"n": len(ref), "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                             "max_abs_diff_logits": float(np.abs(got - ref).max())}
        else:
            runner.run(np.zeros((1, *prep.input_shape), dtype=np.float32))  # the library loads and runs
        meta["build_seconds"] = time.perf_counter() - t0
        (tmp / "build.log").write_text(log.getvalue())
        _write_json(tmp / META_FILE, meta)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move tmp to out_dir; an existing out_dir is set aside first and removed after the swap."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _supported_layers() -> str:
    from hls4ml.converters.pytorch_to_hls import get_supported_pytorch_layers

    return ", ".join(sorted(get_supported_pytorch_layers()))


def _check_quant_report(quant: dict[str, Any], prep: _Prepared) -> None:
    per_layer = quant.get("per_layer_bits")
    if isinstance(per_layer, dict):
        got = {n: q.weight_bits for n, q in prep.qlayers.items()}
        diff = {n: (b, got.get(n)) for n, b in per_layer.items() if got.get(n) != b}
        if diff:
            raise StageError(f"the quantization report does not match the model (layer: (report bits, model "
                             f"bits)) {diff}; pass the report of the op that produced this model")
    act = quant.get("act_bits")
    if isinstance(act, int) and act and any(q.act_bits != act for q in prep.qlayers.values()):
        raise StageError(f"the quantization report says act_bits={act}, the model's layers differ; pass the "
                         "report of the op that produced this model")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _layer_table(hls_model: Any, prec: dict, info: dict) -> list[dict[str, Any]]:
    """What the estimate needs of each hls4ml layer: class, sizes, reuse factor, types."""
    rows = []
    for layer in hls_model.get_layers():
        a = layer.attributes
        row: dict[str, Any] = {"name": layer.name, "class": layer.class_name}
        for k in ("n_in", "n_out", "n_chan", "n_filt", "in_height", "in_width", "out_height", "out_width",
                  "filt_height", "filt_width", "stride_height", "stride_width", "pool_height", "pool_width",
                  "reuse_factor", "strategy", "n_scale_bias"):
            v = a.get(k) if hasattr(a, "get") else None
            if v is not None and not callable(v):
                row[k] = v if isinstance(v, int | float | str) else str(v)
        with contextlib.suppress(Exception):  # layers without an input variable (the input layer)
            p_in = layer.get_input_variable().type.precision
            row["input_bits"] = int(getattr(p_in, "width", 0) or 0)
        out = layer.get_output_variable()
        row["output_shape"] = [int(s) for s in out.shape]
        row["result_t"] = str(out.type.precision.definition_cpp()) if hasattr(out.type.precision, "definition_cpp") \
            else str(out.type.precision)
        for wname, w in layer.weights.items():
            p = w.type.precision
            row.setdefault("weights", {})[wname] = {
                "count": int(np.prod(w.shape)) if w.shape else 1,
                "nonzero": int(np.count_nonzero(w.data)),
                "bits": int(getattr(p, "width", 0) or 0),
                "type": p.definition_cpp() if hasattr(p, "definition_cpp") else str(p),
            }
        if layer.name in info:
            row["role"] = info[layer.name].get("role")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- resource estimate


def _dsp_per_mult(a_bits: int, b_bits: int) -> int:
    """DSP48E2 slices (27 x 18-bit multipliers) per product. hls4ml's own rule (optimization API,
    VivadoDSPEstimator): an operand narrower than 9 bits maps the product to LUTs (0 DSP)."""
    if min(a_bits, b_bits) < 9:
        return 0
    return math.ceil(max(a_bits, b_bits) / 27) * math.ceil(min(a_bits, b_bits) / 18)


def estimate_resources(meta_or_dir: dict[str, Any] | Path | str, *, part: str | None = None,
                       clock_period_ns: float | None = None) -> dict[str, Any]:
    """An ANALYTIC estimate of multipliers, DSPs, BRAM and latency of the built project, from its layer
    table (meta['layers']). Not a synthesis result: AMD Vitis HLS / Vivado are needed for real figures,
    and they are not run here.

    Rules (stated in the result too):
      * multipliers: conv k*k*C_in*C_out / reuse_factor and dense n_in*n_out / reuse_factor (hls4ml's
        Latency strategy unrolls a conv over one output pixel, io_stream); batch-norm style rescales
        C / reuse_factor; non-zero weights only;
      * DSP48E2: multipliers whose narrower operand has >= 9 bits (the rule of hls4ml's optimization
        API, whose estimator itself imports TensorFlow and cannot be used here), ceil(a/27)*ceil(b/18)
        slices each; the others are LUT multipliers, reported with a rough 0.5 LUT per
        partial-product bit;
      * weights: Latency strategy keeps them in LUTs/registers (counted as bits); Resource strategy puts
        them in BRAM: ceil(n_weights * bits / (reuse_factor * 36)) BRAM36 (hls4ml's optimization API
        formula), i.e. twice that in BRAM18;
      * io_stream line buffers: (k-1) rows * width * C_in * bits per conv/pool, in BRAM18 (18 Kib each)
        when over 1 Kib, else registers;
      * latency, io_stream: every layer reads one pixel per cycle, and a conv spends reuse_factor
        cycles per output pixel: max(in_pixels, out_pixels * reuse_factor) cycles per image (a dense
        layer: reuse_factor); the layers run as a dataflow pipeline, so the interval is the slowest
        layer and the latency is bracketed by [slowest layer, sum of all layers] (+ 5 cycles of
        pipeline depth per layer).
    """
    if isinstance(meta_or_dir, str | Path):
        meta = _read_meta(Path(meta_or_dir))
    else:
        meta = meta_or_dir
    part = part or meta.get("part", DEFAULT_PART)
    clock = float(clock_period_ns or meta.get("clock_period_ns", 5.0))
    io_type = meta.get("io_type", "io_stream")
    strategy = meta.get("strategy", "Latency")
    rows = []
    tot = {"multipliers": 0, "dsp": 0, "lut_multipliers": 0, "lut_mult_estimate": 0, "weight_bits": 0,
           "bram18_weights": 0, "bram18_buffers": 0}
    cycles = []
    for L in meta["layers"]:
        cls = L["class"]
        rf = int(L.get("reuse_factor", 1) or 1)
        w = L.get("weights", {})
        mults = 0
        a_bits = b_bits = 0
        if cls in ("Conv2D", "Conv2DBatchnorm", "PointwiseConv2D", "Conv1D", "Dense"):
            wt = w.get("weight", {})
            mults = math.ceil(wt.get("nonzero", 0) / rf)
            b_bits = wt.get("bits", 0)
            a_bits = _in_bits(meta, L)
        elif cls in ("BatchNormalization", "ApplyAlpha"):
            sc = w.get("scale", {})
            n = int(L.get("n_filt", -1) or -1)
            n = sc.get("count", 0) if n in (-1, 0) else n
            mults = math.ceil(n / rf)
            b_bits = sc.get("bits", 0)
            a_bits = _in_bits(meta, L)
        per = _dsp_per_mult(a_bits, b_bits) if mults else 0
        dsp = mults * per
        lutm = 0 if per else mults
        lut_est = int(lutm * 0.5 * a_bits * b_bits)
        wbits = sum(v["count"] * v["bits"] for k, v in w.items() if k in ("weight",))
        bram_w = 0
        if strategy == "Resource" and rf > 1 and wbits:
            bram_w = 2 * math.ceil(wbits / (rf * 36))
        bram_buf = 0
        h_in, w_in = L.get("in_height"), L.get("in_width")
        kh = L.get("filt_height") or L.get("pool_height")
        if io_type == "io_stream" and kh and h_in and w_in and kh > 1:
            c_in = L.get("n_chan") or L.get("n_filt") or 1
            buf = (kh - 1) * w_in * c_in * (_in_bits(meta, L) or 16)
            bram_buf = math.ceil(buf / 18432) if buf > 1024 else 0
        c = _layer_cycles(L, rf, io_type)
        cycles.append((L["name"], c))
        rows.append({"name": L["name"], "class": cls, "reuse_factor": rf, "multipliers": mults,
                     "operand_bits": [a_bits, b_bits] if mults else None, "dsp": dsp, "lut_multipliers": lutm,
                     "weight_bits": wbits, "bram18": bram_w + bram_buf, "cycles_per_image": c})
        tot["multipliers"] += mults
        tot["dsp"] += dsp
        tot["lut_multipliers"] += lutm
        tot["lut_mult_estimate"] += lut_est
        tot["weight_bits"] += wbits
        tot["bram18_weights"] += bram_w
        tot["bram18_buffers"] += bram_buf
    interval = max(c for _, c in cycles) if cycles else 0
    depth = 5 * len(cycles)
    lat_lo, lat_hi = interval + depth, sum(c for _, c in cycles) + depth
    avail = PART_RESOURCES.get(part)
    est: dict[str, Any] = {
        "kind": "analytic estimate (not synthesis): " + SYNTHESIS_NOTE,
        "part": part,
        "clock_period_ns": clock,
        "io_type": io_type,
        "strategy": strategy,
        "totals": {**tot, "bram18": tot["bram18_weights"] + tot["bram18_buffers"]},
        "interval_cycles": interval,
        "latency_cycles": [lat_lo, lat_hi],
        "latency_us": [lat_lo * clock / 1000, lat_hi * clock / 1000],
        "throughput_images_per_s": (1e9 / (interval * clock)) if interval else None,
        "slowest_layer": max(cycles, key=lambda t: t[1])[0] if cycles else None,
        "layers": rows,
    }
    if avail:
        bram = est["totals"]["bram18"]
        est["part_resources"] = avail
        est["fits"] = {
            "DSP": tot["dsp"] <= avail["DSP"],
            "BRAM18": bram <= avail["BRAM18"],
            "LUT (multipliers only)": tot["lut_mult_estimate"] <= avail["LUT"],
        }
    return est


def _layer_cycles(L: dict[str, Any], rf: int, io_type: str) -> int:
    """Cycles a layer needs per image. io_stream: it reads one pixel per cycle and a conv/dense spends
    reuse_factor cycles per output pixel; io_parallel: one pass of reuse_factor cycles (conv: per
    output pixel)."""
    cls = L["class"]
    out = L.get("output_shape") or [1]
    out_pix = int(np.prod(out[:-1])) if len(out) > 1 else 1
    if io_type != "io_stream":
        return rf * (out_pix if "Conv" in cls else 1)
    h, w = L.get("in_height"), L.get("in_width")
    in_pix = h * w if h and w else out_pix
    if "Conv" in cls:
        return max(in_pix, out_pix * rf)
    if cls == "Dense":
        return rf
    if "Pooling" in cls:
        return in_pix
    return out_pix


def _in_bits(meta: dict[str, Any], L: dict[str, Any]) -> int:
    """Width of a layer's (first) input type."""
    return int(L.get("input_bits") or 16)


# --------------------------------------------------------------------------- load / run


def _read_meta(out_dir: Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    rebuild = "rebuild it with tasks.engines.fpga_hls.build_hls"
    if not out_dir.is_dir():
        raise ArtifactError(f"HLS project {out_dir} is missing; {rebuild}")
    p = out_dir / META_FILE
    if not p.is_file():
        raise ArtifactError(f"{p} is missing: {out_dir} is not a complete HLS project; {rebuild}")
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p} is unreadable ({e}); {rebuild}") from e
    if not isinstance(meta, dict) or meta.get("engine") != "hls4ml":
        raise ArtifactError(f"{p} is not the meta of an hls4ml project; {rebuild}")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{p} has format {meta.get('format')!r}, this code reads {FORMAT}; {rebuild}")
    need = ("library", "library_sha256", "firmware_sha256", "input_shape", "input_quant", "num_outputs",
            "project_name", "layers")
    lacking = [k for k in need if k not in meta]
    if lacking:
        raise ArtifactError(f"{p} lacks {lacking}; {rebuild}")
    lib = Path(str(meta["library"]))
    if lib.is_absolute() or ".." in lib.parts or lib.suffix != ".so":
        raise ArtifactError(f"{p} names library {meta['library']!r}, not a .so inside the project; {rebuild}")
    return meta


class HLSRunner:
    """The compiled C simulation of an hls4ml project: float32 NCHW in, logits (float64 -> float32) out.

    Each image is quantized on the host (meta['input_quant']), transposed to channels last and run
    through the C simulation one at a time (hls4ml's streaming C++ keeps static state: calls are
    serialised by a lock)."""

    _lock = threading.Lock()

    def __init__(self, out_dir: Path, meta: dict[str, Any], *, verify: bool = True):
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.input_shape = tuple(meta["input_shape"])
        lib = self.out_dir / meta["library"]
        rebuild = "rebuild it with tasks.engines.fpga_hls.build_hls"
        if not lib.is_file():
            raise ArtifactError(f"the C-simulation library {lib} is missing; {rebuild}")
        if verify:
            got = sha256_file(lib)
            if got != meta["library_sha256"]:
                raise ArtifactError(f"{lib} has sha256 {got[:12]}..., its meta.json says "
                                    f"{meta['library_sha256'][:12]}...: the library is corrupt or from another "
                                    f"build; {rebuild}")
            fw = _firmware_digest(self.out_dir)
            if fw != meta["firmware_sha256"]:
                raise ArtifactError(f"the HLS sources in {self.out_dir / 'firmware'} do not match the ones the "
                                    f"C simulation was compiled from (edited or from another build); {rebuild}")
        try:
            self._lib = ctypes.CDLL(str(lib))
            fn = getattr(self._lib, f"{meta['project_name']}_double")
        except (OSError, AttributeError) as e:
            raise ArtifactError(f"{lib} cannot be loaded as the C simulation of {meta['project_name']} ({e}); "
                                f"{rebuild}") from e
        self._n_out = int(meta["num_outputs"])
        fn.restype = None
        fn.argtypes = [np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")] * 2
        self._fn = fn

    def run(self, x: np.ndarray) -> np.ndarray:
        x = check_input(x, self.input_shape, "the FPGA C simulation")
        codes = quantize_input(x, self.meta["input_quant"])
        if codes.ndim == 4:
            codes = codes.transpose(0, 2, 3, 1)  # NCHW -> NHWC: hls4ml streams channels last
        codes = np.ascontiguousarray(codes.reshape(len(codes), -1), dtype=np.float64)
        out = np.zeros((len(codes), self._n_out), dtype=np.float64)
        with self._lock:
            for i in range(len(codes)):
                self._fn(codes[i], out[i])
        return out.astype(np.float32)


def load_hls(out_dir: Path) -> HLSRunner:
    """A runner for the project build_hls wrote; ArtifactError when it is missing, corrupt or mismatched
    (meta.json, the C-simulation library's sha256, the HLS sources it was compiled from)."""
    out_dir = Path(out_dir)
    return HLSRunner(out_dir, _read_meta(out_dir))


# --------------------------------------------------------------------------- agreement


def agreement(runner: Any, reference: Any, x: np.ndarray, y: Sequence[int] | np.ndarray | None = None,
              *, batch_size: int = 256) -> dict[str, Any]:
    """Top-1 agreement of runner with the reference (a torch model, e.g. the fake-quant one, or its
    logits as an array) on x, and the accuracy of both on labels y when given (percent)."""
    x = np.asarray(x, dtype=np.float32)
    if isinstance(reference, np.ndarray):
        ref = reference
    else:
        import torch

        reference.eval()
        with torch.inference_mode():
            ref = np.concatenate([reference(torch.from_numpy(x[i:i + batch_size])).numpy()
                                  for i in range(0, len(x), batch_size)])
    t = time.perf_counter()
    got = runner.run(x)
    dt = time.perf_counter() - t
    if got.shape != ref.shape:
        raise ValueError(f"runner gives {got.shape}, reference {ref.shape}")
    res: dict[str, Any] = {
        "n": len(x),
        "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        "max_abs_diff_logits": float(np.abs(got - ref).max()),
        "mean_abs_diff_logits": float(np.abs(got - ref).mean()),
        "seconds_per_image": dt / max(len(x), 1),
    }
    if y is not None:
        y = np.asarray(y)
        res["accuracy"] = 100.0 * float((got.argmax(1) == y).mean())
        res["reference_accuracy"] = 100.0 * float((ref.argmax(1) == y).mean())
    return res
