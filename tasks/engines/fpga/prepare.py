"""Quantized layers -> HLS layers: the HLS-ready torch.fx copy of a fake-quant model (`prepare_for_hls`),
its float64 check (`emulate`) and the host-side input quantization (`quantize_input`)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from tasks.engines.base import EngineUnsupported
from tasks.errors import StageError

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
            raise EngineUnsupported(
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
        raise EngineUnsupported(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); hls4ml's "
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
                raise EngineUnsupported(f"{node.target}: AdaptiveAvgPool2d from {h}x{w} to {oh}x{ow} is not a fixed-window "
                                 "pooling; hls4ml cannot express it")
            _set_module(gm, node.target, nn.AvgPool2d((h // oh, w // ow), (h // oh, w // ow)))
            changes.append(f"{node.target}: AdaptiveAvgPool2d({m.output_size}) -> AvgPool2d({h // oh}x{w // ow}), "
                           f"exact for its {h}x{w} input")

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise EngineUnsupported(f"build_hls supports single-input models, this one has {len(placeholders)} inputs")
    users = list(placeholders[0].users)
    bad = [u.format_node() for u in users if not (u.op == "call_module" and u.target in qlayers)]
    if bad:
        raise EngineUnsupported(
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
