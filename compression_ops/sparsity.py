"""Magnitude sparsification of conv and linear weights: unstructured or N:M, one-shot or gradual.

The zeros live in the weights themselves (no torch.nn.utils.prune parametrisation, no mask buffers), so
any engine, torch.export and the packer see a plain model; the masks live in the TrainHook that keeps
pruned weights at exactly zero while fine-tuning.

Which layers: every Conv2d and Linear, except depthwise convs by default (few weights, the most
sensitive layers, and no sparse kernel gains anything on 9 weights per channel), layers named in
`skip`, and the classifier when `skip_classifier` is set (the last conv/linear layer registered).

N:M ("2:4"): in every group of M consecutive weights along the input channels, keep the N largest
magnitudes. For a conv the groups run along input channels at each kernel position (weight viewed as
out x kh x kw x in), the layout NVIDIA's sparse tensor cores and ASP use; for 1x1 convs and linear
layers that is simply consecutive inputs. A layer whose input channels are not a multiple of M (e.g.
a stem with one input channel) is left dense and named under "skipped" in the report.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from compression_ops.base import OpConfig, OpConfigError, OpResult, TrainHook, check_range, register_op
from compression_ops.metrics import sparsity as model_sparsity
from compression_ops.packing import packing_report

SCOPES = ("global", "layer")
SCHEDULES = ("oneshot", "gradual")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (n, m) for an "n:m" pattern; raises OpConfigError otherwise."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m <= 64:
        raise OpConfigError(f"pattern={pattern!r}: expected 'unstructured' or 'N:M' with 0 < N < M <= 64, e.g. '2:4'")
    return n, m


@dataclasses.dataclass
class Sparsify(OpConfig):
    """Zero out the smallest-magnitude conv/linear weights.

    sparsity: fraction of weights zeroed, in [0, 1); None means 0.5, or 1 - N/M for an N:M pattern.
    pattern: "unstructured" or "N:M" such as "2:4" (keep N of every M along the inputs; one-shot only).
    scope: "global" (one magnitude threshold over all layers) or "layer" (each layer at `sparsity`).
    schedule: "oneshot" (prune now, keep the masks while fine-tuning) or "gradual" (Zhu & Gupta 2017:
        s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, from initial_sparsity at begin_fraction of
        the fine-tuning steps to sparsity at end_fraction, raised every update_every steps).
    skip: layer names (or names of modules containing them) left dense.
    """

    op = "sparsify"
    phase = "train"
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str = "global"
    schedule: str = "oneshot"
    initial_sparsity: float = 0.0
    begin_fraction: float = 0.0
    end_fraction: float = 0.75
    update_every: int = 10
    skip: list[str] = dataclasses.field(default_factory=list)
    skip_classifier: bool = False
    skip_depthwise: bool = True

    def validate(self) -> None:
        nm = parse_pattern(self.pattern)
        if self.sparsity is not None:
            check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise OpConfigError(
                    f"pattern={self.pattern!r} keeps {nm[0]} of every {nm[1]} weights, i.e. sparsity {implied:g}; "
                    f"got sparsity={self.sparsity!r}: set sparsity={implied:g} or leave it unset"
                )
            if self.schedule != "oneshot":
                raise OpConfigError(f"pattern={self.pattern!r} is applied one-shot: set schedule='oneshot'")
        if self.scope not in SCOPES:
            raise OpConfigError(f"scope={self.scope!r}: expected one of {', '.join(SCOPES)}")
        if self.schedule not in SCHEDULES:
            raise OpConfigError(f"schedule={self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        check_range("initial_sparsity", self.initial_sparsity, 0.0, self.target)
        check_range("begin_fraction", self.begin_fraction, 0.0, 1.0, hi_open=True)
        check_range("end_fraction", self.end_fraction, self.begin_fraction, 1.0, lo_open=True)
        check_range("update_every", self.update_every, 1, 1_000_000)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target(self) -> float:
        """The final sparsity of the pruned layers."""
        if self.sparsity is not None:
            return self.sparsity
        nm = self.nm
        return 0.5 if nm is None else 1 - nm[0] / nm[1]


def zhu_gupta(step: int, t0: int, t1: int, s_i: float, s_f: float) -> float:
    """Sparsity at `step` of the cubic schedule from s_i at t0 to s_f at t1."""
    if step <= t0:
        return s_i
    if step >= t1:
        return s_f
    return s_f + (s_i - s_f) * (1 - (step - t0) / (t1 - t0)) ** 3


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| in every group of m consecutive input channels (dim 1), per output channel
    and kernel position. w.shape[1] must be a multiple of m."""
    wt = w.detach().movedim(1, -1)  # (out, [kh, kw,] in): groups along the input channels
    groups = wt.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(wt.shape).movedim(-1, 1).contiguous()


def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str, masks: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masks (True = kept) zeroing round(sparsity * n) smallest |w|, over all layers or per layer.

    Weights already masked in `masks` stay masked, so a rising schedule never revives a weight.
    """
    scores = {}
    for name, w in weights.items():
        s = w.detach().abs().reshape(-1).float()
        if masks is not None:
            s = torch.where(masks[name].reshape(-1), s, torch.full_like(s, -1.0))
        scores[name] = s
    out = {}
    groups = [list(scores)] if scope == "global" else [[name] for name in scores]
    for names in groups:
        flat = torch.cat([scores[n] for n in names])
        k = round(sparsity * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:k]] = False
        for name, part in zip(names, keep.split([scores[n].numel() for n in names]), strict=True):
            out[name] = part.reshape(weights[name].shape)
    return out


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def select_layers(
    model: nn.Module, skip: list[str], *, skip_classifier: bool = False, skip_depthwise: bool = False
) -> dict[str, nn.Module]:
    """The conv/linear layers an op compresses, by name; unknown names in `skip` raise OpConfigError."""
    return layer_selection(model, skip, skip_classifier=skip_classifier, skip_depthwise=skip_depthwise)[0]


def layer_selection(
    model: nn.Module, skip: list[str], *, skip_classifier: bool = False, skip_depthwise: bool = False
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(the conv/linear layers an op compresses, {each other conv/linear layer: why it is left alone})."""
    modules = dict(model.named_modules())
    unknown = [n for n in skip if n not in modules]
    if unknown:
        raise OpConfigError(f"layer name(s) {unknown} not in the model; names look like {list(modules)[1:4]}")
    layers = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d | nn.Linear)}
    left: dict[str, str] = {}
    if skip_classifier and layers:
        left[list(layers)[-1]] = "classifier (skip_classifier)"
    for n, m in layers.items():
        if n in left:
            continue
        if any(n == s or n.startswith(s + ".") for s in skip):
            left[n] = "in skip"
        elif skip_depthwise and _is_depthwise(m):
            left[n] = "depthwise conv (skip_depthwise)"
    return {n: m for n, m in layers.items() if n not in left}, left


def _apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            layers[name].weight.masked_fill_(~mask, 0.0)  # +0.0, not w * 0 (which gives -0.0 for w < 0)


def _achieved(layers: dict[str, nn.Module]) -> dict[str, Any]:
    per_layer = {n: float((m.weight == 0).float().mean()) for n, m in layers.items()}
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return {"sparsity": zeros / total if total else 0.0, "per_layer": per_layer}


class SparsityHook(TrainHook):
    """Raises sparsity on the gradual schedule before each step and re-applies the masks after each
    optimizer step, so pruned weights stay exactly zero."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                 cfg: Sparsify, current: float):
        self.model, self.layers, self.masks, self.cfg = model, layers, masks, cfg
        self.current = current  # the sparsity the masks were last computed for
        self.history: list[tuple[int, float]] = []  # (step, sparsity) at every mask update

    def target_at(self, step: int, total_steps: int) -> float | None:
        """The sparsity to prune to before `step`, or None when this step is no update."""
        cfg = self.cfg
        if cfg.schedule != "gradual" or total_steps <= 0:
            return None
        # The last step is total_steps - 1: end there at the latest, so the final sparsity is reached.
        t1 = min(round(cfg.end_fraction * total_steps), total_steps - 1)
        t0 = min(round(cfg.begin_fraction * total_steps), t1)
        if step >= t1:
            return cfg.target
        if step < t0 or (step - t0) % cfg.update_every:
            return None
        return zhu_gupta(step, t0, t1, cfg.initial_sparsity, cfg.target)

    def before_step(self, step: int, total_steps: int) -> None:
        s = self.target_at(step, total_steps)
        if s is None or s <= self.current:
            return
        weights = {n: m.weight for n, m in self.layers.items()}
        self.masks = magnitude_masks(weights, s, self.cfg.scope, self.masks)
        self.current = s
        self.history.append((step, s))
        _apply_masks(self.layers, self.masks)

    def after_step(self, step: int, total_steps: int, lr: float | None = None) -> None:
        _apply_masks(self.layers, self.masks)

    def finish(self) -> dict[str, Any]:
        got = _achieved(self.layers)
        return {
            "hook": self.cfg.op,
            "target_sparsity": self.cfg.target,
            "sparsity": got["sparsity"],
            "model_sparsity": model_sparsity(self.model),
            "per_layer": got["per_layer"],
            "target_reached": got["sparsity"] >= self.cfg.target - 1e-3,
            "packed_bytes": packing_report(self.model)["packed_bytes"],
        }


@register_op(Sparsify)
def sparsify(model: nn.Module, cfg: Sparsify, data: Any = None) -> OpResult:
    """Sparsify a copy of `model`; the hook keeps (and, when gradual, raises) the sparsity while training."""
    model = copy.deepcopy(model)
    before = packing_report(model)["packed_bytes"]
    layers, skipped = layer_selection(
        model, cfg.skip, skip_classifier=cfg.skip_classifier, skip_depthwise=cfg.skip_depthwise
    )
    nm = cfg.nm
    if nm is not None:
        n, m = nm
        for name in list(layers):
            if layers[name].weight.shape[1] % m:
                skipped[name] = f"{layers[name].weight.shape[1]} input channel(s) per group, not a multiple of {m}"
                del layers[name]
        masks = {name: nm_mask(mod.weight, n, m) for name, mod in layers.items()}
        current = cfg.target
    else:
        current = cfg.target if cfg.schedule == "oneshot" else cfg.initial_sparsity
        masks = magnitude_masks({name: mod.weight for name, mod in layers.items()}, current, cfg.scope)
    if not layers:
        raise OpConfigError(f"{cfg.op}: no layer left to sparsify (check skip, skip_depthwise, pattern)")
    _apply_masks(layers, masks)
    got = _achieved(layers)
    packed = packing_report(model)
    report = {
        "op": cfg.op,
        "pattern": cfg.pattern,
        "scope": cfg.scope,
        "schedule": cfg.schedule,
        "target_sparsity": cfg.target,
        "sparsity": got["sparsity"],
        "model_sparsity": model_sparsity(model),
        "per_layer": got["per_layer"],
        "applied": list(layers),
        "skipped": skipped,
        "packed_bytes": packed["packed_bytes"],
        "packed_bytes_before": before,
        "packed_ratio": packed["packed_bytes"] / before,
    }
    return OpResult(model, report, [SparsityHook(model, layers, masks, cfg, current)])
