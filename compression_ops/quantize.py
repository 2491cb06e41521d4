"""Uniform quantization: calibration ranges, BN folding, fake-quant Conv2d/Linear, and the PTQ and QAT ops.

Weights are symmetric, signed and per output channel on the grid -qmax..qmax, qmax = 2^(bits-1) - 1
(ONNX Runtime's symmetric QInt8 grid, so tasks.engines.onnx_int8 rounds 8-bit weights to the same
values). Activations are quantized per tensor at the input of every Conv2d/Linear, asymmetric and
unsigned (0..2^bits - 1) with zero exactly representable, as ONNX Runtime's QUInt8 activations are.

Calibration ranges and weight scales come from compression_ops.quant_ranges, shared with the ONNX
int8 export.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from compression_ops.base import (
    OpConfig,
    OpConfigError,
    OpData,
    OpResult,
    check_range,
    param_layers,
    register_op,
)
from compression_ops.quant_ranges import (
    METHODS,
    WEIGHT_RANGES,
    RangeObserver,
    fake_quant_weight,
    qparams,
    qrange,
    weight_scales,
)


def _conv_bn_pairs(model: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """(conv, bn) names where the BatchNorm2d's only input is the conv's output and nothing else reads it.

    A model torch.fx cannot trace (transformers models, data-dependent control flow) is searched part by
    part: each child that traces is read whole, the others are opened further. A pair found inside a
    traced part is safe to fold, since a conv output read outside that part would be one of its outputs.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable (any error of the tracer): look inside its children
        pairs = []
        for name, child in model.named_children():
            if any(isinstance(m, nn.BatchNorm2d) for m in child.modules()):
                pairs += _conv_bn_pairs(child, f"{prefix}{name}.")
        return pairs
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in graph.nodes:
        if n.op != "call_module" or not isinstance(modules[n.target], nn.BatchNorm2d) or not n.args:
            continue
        src = n.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[n.target] == 1
        ):
            pairs.append((prefix + src.target, prefix + n.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm2d that directly follows a Conv2d into it, using the running statistics (the
    eval-mode BN), and put nn.Identity in its place; in place. Returns the names of the folded BNs."""
    modules = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in _conv_bn_pairs(model):
        conv, bn = modules[conv_name], modules[bn_name]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        with torch.no_grad():
            a = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                a = a * bn.weight
            shift = bn.bias if bn.affine else torch.zeros_like(a)
            b = conv.bias if conv.bias is not None else torch.zeros_like(a)
            conv.weight.mul_(a.reshape(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = nn.Parameter((b - bn.running_mean) * a + shift)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
        folded.append(bn_name)
    return folded


class _FakeQuant:
    """Shared by QuantConv2d and QuantLinear: the input activation's range and its fake quantization.

    The range lives in buffers act_lo/act_hi: set by calibration, then, when `track_ranges`, moved
    towards each training batch's min/max by an EMA with `momentum`; never changed in eval mode.
    """

    weight: nn.Parameter
    weight_bits: int
    act_bits: int

    def _init_quant(self, weight_bits: int, act_bits: int, weight_range: str, track_ranges: bool, momentum: float):
        self.weight_bits, self.act_bits = int(weight_bits), int(act_bits)
        self.weight_range = weight_range
        self.track_ranges, self.momentum = track_ranges, momentum
        # Per-channel clipping of the weight range, as a fraction of each channel's max |w|: chosen once
        # by the MSE search ("mse"; the search is too slow to repeat every training step), else 1.
        clip = torch.ones(self.weight.shape[0], device=self.weight.device)
        if weight_range == "mse":
            clip = weight_scales(self.weight, weight_bits, "mse") / weight_scales(self.weight, weight_bits)
        self.register_buffer("weight_clip", clip)
        self.register_buffer("act_lo", torch.zeros(()))
        self.register_buffer("act_hi", torch.zeros(()))
        self.calibrated = False
        self.observer: RangeObserver | None = None

    def set_act_range(self, lo: float, hi: float) -> None:
        self.act_lo.fill_(lo)
        self.act_hi.fill_(hi)
        self.calibrated = True

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:  # calibrating: observe the float input, change nothing
            self.observer.observe(x)
            return x
        if self.training and self.track_ranges:
            with torch.no_grad():
                lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
                if not self.calibrated:
                    self.set_act_range(float(lo), float(hi))
                else:
                    self.act_lo.lerp_(lo, self.momentum)
                    self.act_hi.lerp_(hi, self.momentum)
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__}: activation range not calibrated; run calibrate() first")
        scale, zp = qparams(self.act_lo, self.act_hi, self.act_bits, signed=False)
        qmin, qmax = qrange(self.act_bits, signed=False)
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zp.to(torch.int32), qmin, qmax)

    def quant_weight(self) -> torch.Tensor:
        """The weight as used in forward: fake-quantized, gradients straight through."""
        scale = weight_scales(self.weight, self.weight_bits) * self.weight_clip
        return fake_quant_weight(self.weight, scale, self.weight_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"  # type: ignore[misc]


class QuantConv2d(_FakeQuant, nn.Conv2d):
    """A Conv2d whose weight (per output channel) and input (per tensor) are fake-quantized."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, act_bits: int = 8, *, weight_range: str = "max",
                   track_ranges: bool = False, momentum: float = 0.01) -> QuantConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
        q.weight, q.bias = conv.weight, conv.bias
        q._init_quant(weight_bits, act_bits, weight_range, track_ranges, momentum)
        return q.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)

    def to_plain(self) -> nn.Conv2d:
        """A plain Conv2d holding the quantized weight (its `weight_bits` attribute says how many bits)."""
        c = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                      self.dilation, self.groups, self.bias is not None, self.padding_mode,
                      device=self.weight.device, dtype=self.weight.dtype)
        return _bake(self, c)


class QuantLinear(_FakeQuant, nn.Linear):
    """A Linear whose weight (per output feature) and input (per tensor) are fake-quantized."""

    @classmethod
    def from_float(cls, lin: nn.Linear, weight_bits: int, act_bits: int = 8, *, weight_range: str = "max",
                   track_ranges: bool = False, momentum: float = 0.01) -> QuantLinear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                dtype=lin.weight.dtype)
        q.weight, q.bias = lin.weight, lin.bias
        q._init_quant(weight_bits, act_bits, weight_range, track_ranges, momentum)
        return q.train(lin.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)

    def to_plain(self) -> nn.Linear:
        """A plain Linear holding the quantized weight (its `weight_bits` attribute says how many bits)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        return _bake(self, lin)


def _bake(q: QuantConv2d | QuantLinear, plain: nn.Conv2d | nn.Linear) -> nn.Module:
    with torch.no_grad():
        plain.weight.copy_(q.quant_weight())
        if q.bias is not None:
            plain.bias.copy_(q.bias)
    plain.weight_bits = q.weight_bits  # read by compression_ops.metrics.weight_bits
    return plain.train(q.training)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers an op would quantize."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear) and n]


def wrap_layers(model: nn.Module, bits: int, act_bits: int = 8, per_layer_bits: dict[str, int] | None = None,
                **kwargs: Any) -> dict[str, QuantConv2d | QuantLinear]:
    """Replace every Conv2d/Linear by its fake-quant twin (weights at per_layer_bits.get(name, bits)); in place."""
    per_layer_bits = per_layer_bits or {}
    names = quantizable_layers(model)
    unknown = sorted(set(per_layer_bits) - set(names))
    if unknown:
        raise OpConfigError(f"per_layer_bits names {unknown}, which are not Conv2d/Linear layers of the model; "
                            f"its layers are: {', '.join(names)}")
    out = {}
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, QUANT_LAYERS):
            raise OpConfigError(f"layer {name!r} is already fake-quantized: apply one quantization op per model")
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        q = cls.from_float(m, per_layer_bits.get(name, bits), act_bits, **kwargs)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
        out[name] = q
    return out


def calibrate(model: nn.Module, batches: list, method: str = "minmax", percentile: float = 99.99) -> int:
    """Set every fake-quant layer's input range from the batches (float forward, eval mode); returns
    the number of images seen. A layer the batches never reach stays uncalibrated (`calibrated` False)."""
    layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for m in layers:
            m.observer = RangeObserver()
        with torch.no_grad():
            for x, *_ in batches:
                model(x)
                seen += len(x)
        for m in layers:
            if m.observer.lo <= m.observer.hi:  # saw at least one value
                m.set_act_range(*m.observer.range(method, bits=m.act_bits, signed=False, percentile=percentile))
    finally:
        for m in layers:
            m.observer = None
        model.train(was_training)
    return seen


def _check_bits(name: str, bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise OpConfigError(f"{name}={bits!r}: expected an integer number of bits in [2, 8]")
    check_range(name, bits, 2, 8)


def _check_common(cfg: QuantizeInt8 | QuantAware) -> None:
    if cfg.calibration not in METHODS:
        raise OpConfigError(f"calibration={cfg.calibration!r}: expected one of {', '.join(METHODS)}")
    check_range("percentile", cfg.percentile, 50.0, 100.0, lo_open=True)
    check_range("calib_batches", cfg.calib_batches, 1, 100_000)
    for name, b in (cfg.per_layer_bits or {}).items():
        _check_bits(f"per_layer_bits[{name!r}]", b)


def _calib_batches(op: str, cfg: QuantizeInt8 | QuantAware, data: Any) -> list:
    if not isinstance(data, OpData) or data.batches is None:
        raise OpConfigError(f"{op} calibrates activation ranges on data: pass OpData(example=..., batches=...)")
    batches = list(itertools.islice(data.batches, cfg.calib_batches))
    if not batches:
        raise OpConfigError(f"{op} got an empty OpData.batches: it needs at least one batch to calibrate")
    return batches


def _drop_uncalibrated(model: nn.Module, layers: dict[str, Any], originals: dict[str, nn.Module]) -> dict[str, str]:
    """Put the float layer back wherever calibration never reached the fake-quant one (a layer the forward
    pass does not run, e.g. an unused head): it has no input range to quantize with. In place."""
    skipped = {}
    for name in [n for n, q in layers.items() if not q.calibrated]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, originals[name])
        del layers[name]
        skipped[name] = "kept in float: not run by the calibration batches"
    return skipped


def _kept_in_float(model: nn.Module, changed: set[str]) -> dict[str, str]:
    """Why each layer with weights of its own that the op did not change stays float."""
    why = {}
    for name, m in param_layers(model).items():
        if name in changed or isinstance(m, QUANT_LAYERS):
            continue
        kind = type(m).__name__
        if isinstance(m, nn.LayerNorm | nn.GroupNorm):
            why[name] = f"kept in float: {kind} (normalisation statistics need float)"
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            why[name] = f"kept in float: {kind} not folded (no Conv2d whose output only it reads)"
        elif isinstance(m, nn.Conv2d | nn.Linear):
            why[name] = f"kept in float: {kind} (see the op's other skip reasons)"
        else:
            why[name] = f"kept in float: {kind} (only Conv2d and Linear are quantized)"
    return why


def _summary(cfg: QuantizeInt8 | QuantAware, layers: dict[str, Any], seen: int) -> dict[str, Any]:
    n = sum(q.weight.numel() for q in layers.values())
    return {
        "op": cfg.op,
        "calibration": cfg.calibration,
        "percentile": cfg.percentile,
        "calib_images": seen,
        "layers_quantized": len(layers),
        "weight_bits": sum(q.weight.numel() * q.weight_bits for q in layers.values()) / max(n, 1),
        "act_bits": next(iter(layers.values())).act_bits if layers else 0,
        "per_layer_bits": {k: q.weight_bits for k, q in layers.items()},
    }


@dataclasses.dataclass
class QuantizeInt8(OpConfig):
    """Post-training int8: fold BN, fake-quantize every Conv2d/Linear (per-channel weights, per-tensor
    input activations), calibrate activation ranges on the first `calib_batches` of OpData.batches
    (OpData.max_batches does not cap them).

    calibration: minmax, percentile (at `percentile`) or mse; see choose_range.
    per_layer_bits: layer name -> weight bits (2..8) for mixed precision in this PyTorch simulation. The
        ONNX int8 artifact (tasks.engines.onnx_int8) stores every weight in int8 regardless.
    """

    op = "quantize_int8"
    phase = "post"
    calibration: str = "minmax"
    percentile: float = 99.99
    calib_batches: int = 8
    per_layer_bits: dict[str, int] | None = None

    def validate(self) -> None:
        _check_common(self)


@register_op(QuantizeInt8)
def quantize_int8(model: nn.Module, cfg: QuantizeInt8, data: OpData) -> OpResult:
    """A folded, fake-quantized, calibrated copy of `model` in eval mode; the original is left untouched."""
    batches = _calib_batches("quantize_int8", cfg, data)
    model = copy.deepcopy(model).eval()
    folded = fold_batchnorm(model)
    originals = {n: model.get_submodule(n) for n in quantizable_layers(model)}
    layers = wrap_layers(model, 8, 8, cfg.per_layer_bits, track_ranges=False)
    seen = calibrate(model, batches, cfg.calibration, cfg.percentile)
    skipped = _drop_uncalibrated(model, layers, originals)
    skipped |= _kept_in_float(model, set(layers) | set(skipped))
    report = {
        **_summary(cfg, layers, seen),
        "bn_folded": len(folded),
        # a folded BatchNorm is changed too: merged into its conv, nn.Identity in its place
        "applied": [*layers, *folded],
        "skipped": skipped,
    }
    return OpResult(model.eval(), report)


@dataclasses.dataclass
class QuantAware(OpConfig):
    """Quantization-aware training: fake-quantize every Conv2d/Linear at `bits` (weights, per output
    channel) and `act_bits` (inputs, per tensor), calibrate the input ranges as QuantizeInt8 does, then
    let fine-tuning train through the rounding (straight-through estimator) while each input range
    follows an EMA (`act_momentum`) of the training batches' min/max; eval mode freezes the ranges.

    BatchNorm is kept, not folded, so BN keeps training and the model stays checkpoint-compatible after
    to_plain(): per-channel symmetric weight codes survive folding BN later exactly (folding scales each
    output channel, and so its scale, by one factor).
    weight_range: per-channel weight scale from the channel's max ("max"), or clipped below it by a ratio
        an MSE search picks per channel when the op is applied ("mse"; better at 2-4 bits).
    """

    op = "qat"
    phase = "train"
    bits: int = 8
    act_bits: int = 8
    per_layer_bits: dict[str, int] | None = None
    calibration: str = "minmax"
    percentile: float = 99.99
    calib_batches: int = 8
    act_momentum: float = 0.01
    weight_range: str = "max"

    def validate(self) -> None:
        _check_bits("bits", self.bits)
        _check_bits("act_bits", self.act_bits)
        _check_common(self)
        check_range("act_momentum", self.act_momentum, 0.0, 1.0)
        if self.weight_range not in WEIGHT_RANGES:
            raise OpConfigError(f"weight_range={self.weight_range!r}: expected one of {', '.join(WEIGHT_RANGES)}")


@register_op(QuantAware)
def quant_aware(model: nn.Module, cfg: QuantAware, data: OpData) -> OpResult:
    """A fake-quantized, calibrated copy of `model`, ready for fit(); to_plain() bakes the weights in."""
    batches = _calib_batches("qat", cfg, data)
    was_training = model.training
    model = copy.deepcopy(model)
    originals = {n: model.get_submodule(n) for n in quantizable_layers(model)}
    layers = wrap_layers(model, cfg.bits, cfg.act_bits, cfg.per_layer_bits, weight_range=cfg.weight_range,
                         track_ranges=True, momentum=cfg.act_momentum)
    seen = calibrate(model, batches, cfg.calibration, cfg.percentile)
    skipped = _drop_uncalibrated(model, layers, originals)
    skipped |= _kept_in_float(model, set(layers) | set(skipped))
    report = {**_summary(cfg, layers, seen), "bits": cfg.bits, "weight_range": cfg.weight_range,
              "applied": list(layers), "skipped": skipped}
    return OpResult(model.train(was_training), report)


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integer form of a (fake-)quantized model, what a device stores: per quantized layer the
    weight as int8 codes (`bits` wide) and its per-channel float scales; every other tensor as it is.

    Packed with compression_ops.packing, codes narrower than 8 bits are bit-packed (codebook encoding),
    so the file size is the quantized model's real size. A model without fake-quant layers comes back
    unchanged.
    """
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if not isinstance(m, _FakeQuant):
            continue
        prefix = f"{name}." if name else ""
        with torch.no_grad():
            scale = (weight_scales(m.weight, m.weight_bits) * m.weight_clip).float()
            qmax = qrange(m.weight_bits, signed=True)[1]
            shape = (-1,) + (1,) * (m.weight.dim() - 1)
            codes = torch.round(m.weight.detach() / scale.view(shape)).clamp(-qmax, qmax).to(torch.int8)
        sd[f"{prefix}weight"] = codes
        sd[f"{prefix}weight_scale"] = scale
        sd.pop(f"{prefix}weight_clip", None)  # folded into weight_scale
    return sd
