"""Per-layer sensitivity: the accuracy lost when one layer alone is compressed at a given setting.

The search (issue 4) uses it to shape per-layer ratios and bit widths; the pipeline plots it. No
fine-tuning happens here: it ranks layers, it does not predict the final accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compression_ops.base import OpData, apply
from compression_ops.channel_prune import ChannelPrune, output_layers

Perturb = Callable[[nn.Module, str, Any], nn.Module]


def scan(
    model: nn.Module,
    layers: Sequence[str],
    settings: Sequence[Any],
    perturb: Perturb,
    accuracy: Callable[[nn.Module], float],
) -> dict[str, Any]:
    """Accuracy of `perturb(copy, layer, setting)` for every layer and setting, and its drop from the base."""
    base = accuracy(model)
    rows = []
    for layer in layers:
        for setting in settings:
            acc = accuracy(perturb(copy.deepcopy(model), layer, setting))
            rows.append({"layer": layer, "setting": setting, "accuracy": acc, "drop": base - acc})
    return {"base_accuracy": base, "rows": rows}


def prunable_convs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv layers whose output channels channel pruning can remove (not depthwise, not the classifier)."""
    skip = {id(m) for m in output_layers(model, example)}
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and id(m) not in skip and m.out_channels > 1
    ]


def prune_roots(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The root layer of every channel-pruning group: pruning any other member of a group prunes the same
    channels, so scanning the roots alone says all the scan can say, for a fraction of the work."""
    from compression_ops.channel_prune import prune_groups

    return [g[0] for g in prune_groups(model, example)]


def prune_sensitivity(
    model: nn.Module,
    data: OpData,
    accuracy: Callable[[nn.Module], float],
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Prune each layer's channels alone (L2 magnitude; coupled layers of its group follow) at each ratio.
    layers: the layers to scan (default: every prunable conv; prune_roots gives one per group)."""

    def perturb(m: nn.Module, layer: str, ratio: float) -> nn.Module:
        return apply(m, ChannelPrune(ratio=0.0, per_layer={layer: ratio}), data).model

    names = prunable_convs(model, data.example) if layers is None else list(layers)
    out = scan(model, names, ratios, perturb, accuracy)
    out["kind"] = "channel_prune"
    return out


def weight_layers(model: nn.Module) -> list[str]:
    """Layers whose weights quantization rounds: every Conv2d and Linear."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def weight_bits_sensitivity(
    model: nn.Module, accuracy: Callable[[nn.Module], float], bits: Sequence[int] = (8, 4, 2),
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Round one layer's weights to `bits` (symmetric, per output channel), all else in float."""
    from compression_ops.quant_ranges import quantize_weight_per_channel

    def perturb(m: nn.Module, layer: str, b: int) -> nn.Module:
        mod = dict(m.named_modules())[layer]
        with torch.no_grad():
            mod.weight.copy_(quantize_weight_per_channel(mod.weight, b))
        return m

    out = scan(model, weight_layers(model) if layers is None else list(layers), bits, perturb, accuracy)
    out["kind"] = "weight_bits"
    return out
