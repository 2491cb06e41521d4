"""Precision choice: fixed-point types per hls4ml layer from worst-case bounds propagated from the
integer codes (`_choose_precisions`), and the per-layer reuse factor of reuse_factor="auto"."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tasks.engines.fpga.prepare import _Prepared, _QLayer, _trace

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
