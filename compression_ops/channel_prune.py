"""Dependency-aware channel pruning, wrapping Torch-Pruning's dependency graph.

Torch-Pruning keeps residual adds, concatenations and depthwise groups consistent; we choose the
importance criterion, the per-layer ratios, and solve for the ratio that meets a MACs target.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from compression_ops.base import OpConfig, OpConfigError, OpData, OpResult, check_range, register_op
from compression_ops.metrics import count_macs, count_params

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")


@dataclasses.dataclass
class ChannelPrune(OpConfig):
    """Remove a fraction of output channels per prunable layer.

    ratio: fraction removed from every layer (ignored where per_layer names the layer).
    target_macs_reduction: if set, solve the uniform ratio so MACs fall by this factor (e.g. 2.0).
    """

    op = "channel_prune"
    ratio: float = 0.5
    importance: str = "l2"
    per_layer: dict[str, float] | None = None
    target_macs_reduction: float | None = None
    round_to: int | None = None
    ignore: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, hi_open=True)
        if self.importance not in IMPORTANCES:
            raise OpConfigError(f"importance={self.importance!r}: expected one of {', '.join(IMPORTANCES)}")
        for name, r in (self.per_layer or {}).items():
            check_range(f"per_layer[{name!r}]", r, 0.0, 1.0, hi_open=True)
        if self.target_macs_reduction is not None:
            check_range("target_macs_reduction", self.target_macs_reduction, 1.0, 1e6, lo_open=True)
        if self.round_to is not None:
            check_range("round_to", self.round_to, 1, 1024)


def _importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose outputs are the logits: pruning them would change the number of classes."""
    with torch.no_grad():
        n_out = model(example).shape[-1]
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_out]


def _prune_in_place(model: nn.Module, cfg: ChannelPrune, ratio: float, data: OpData) -> None:
    import torch_pruning as tp

    modules = dict(model.named_modules())
    unknown = [n for n in list(cfg.ignore) + list(cfg.per_layer or {}) if n not in modules]
    if unknown:
        raise OpConfigError(f"layer name(s) {unknown} not in the model; names look like {list(modules)[1:4]}")
    ignored = _output_layers(model, data.example) + [modules[n] for n in cfg.ignore]
    ratio_dict = {modules[n]: r for n, r in (cfg.per_layer or {}).items()}
    pruner = tp.pruner.MetaPruner(
        model,
        data.example,
        importance=_importance(cfg.importance),
        pruning_ratio=ratio,
        pruning_ratio_dict=ratio_dict or None,
        ignored_layers=ignored,
        round_to=cfg.round_to,
    )
    if cfg.importance == "taylor":
        batches = data.limited()
        if not batches:
            raise OpConfigError("importance='taylor' needs labelled batches (gradient x weight)")
        model.zero_grad()
        was_training = model.training
        model.eval()  # BN statistics are not to move while gathering gradients
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
        model.train(was_training)
    pruner.step()
    model.zero_grad(set_to_none=True)


def solve_ratio(model: nn.Module, cfg: ChannelPrune, data: OpData, target_reduction: float) -> float:
    """Bisect the uniform ratio whose pruned model has base_macs / target_reduction MACs or fewer."""
    base = count_macs(model, data.example)
    goal = base / target_reduction
    probe_cfg = dataclasses.replace(cfg, importance="l2")  # which channels go does not change the MACs
    # Torch-Pruning skips a layer whose ratio would leave it no channel, which breaks the bisection's
    # monotonicity at high ratios: cap the ratio so the narrowest layer keeps one channel (one group of
    # round_to channels when rounding).
    narrowest = min(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    lo, hi = 0.0, min(0.95, 1.0 - (cfg.round_to or 1) / narrowest)
    m_hi = copy.deepcopy(model)
    _prune_in_place(m_hi, probe_cfg, hi, data)
    if count_macs(m_hi, data.example) > goal:
        raise OpConfigError(
            f"a {target_reduction}x MACs reduction is out of reach by channel pruning alone "
            f"(even ratio {hi} leaves {count_macs(m_hi, data.example) / base:.0%} of the MACs)"
        )
    for _ in range(14):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        _prune_in_place(m, probe_cfg, mid, data)
        if count_macs(m, data.example) <= goal:
            hi = mid
        else:
            lo = mid
    return math.ceil(hi * 1e4) / 1e4  # round up: rounding down can fall back below the goal


@register_op(ChannelPrune)
def channel_prune(model: nn.Module, cfg: ChannelPrune, data: OpData) -> OpResult:
    """Prune a copy of `model`; the original is left untouched."""
    if not isinstance(data, OpData):
        raise OpConfigError("channel_prune needs OpData(example=<input tensor>, batches=...)")
    model = copy.deepcopy(model)
    macs0, params0 = count_macs(model, data.example), count_params(model)
    ratio = cfg.ratio
    if cfg.target_macs_reduction is not None:
        ratio = solve_ratio(model, cfg, data, cfg.target_macs_reduction)
    _prune_in_place(model, cfg, ratio, data)
    macs1, params1 = count_macs(model, data.example), count_params(model)
    return OpResult(
        model,
        {
            "op": cfg.op,
            "ratio": ratio,
            "importance": cfg.importance,
            "macs_before": macs0,
            "macs_after": macs1,
            "macs_reduction": macs0 / max(macs1, 1),
            "params_before": params0,
            "params_after": params1,
        },
    )
