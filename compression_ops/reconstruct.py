"""Keep the function through the cut: after channel pruning, re-fit every layer whose inputs lost channels
so that, on calibration data, its outputs match the unpruned layer's (least squares on feature maps, as
ThiNet and PocketFlow's channel-pruned learner do).

Layers are re-fit in forward order, each on the inputs the pruned network (with the layers before it
already re-fit) gives it, against the original network's outputs on the same images: errors do not
pile up through the depth. A conv's least squares run on unfolded patches at a sample of output
positions; the normal equations are accumulated batch by batch, so memory does not grow with the
calibration set. A ridge term pulls towards the pruned weights where the data say little.

Which original channels a pruned layer kept is read from Torch-Pruning's pruning history, replayed on
two copies of the original whose weights hold their own output and input channel indices.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def kept_channels(original: nn.Module, history: list, example: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per conv/linear layer name: (kept output channel indices, kept input channel indices) of the original,
    by replaying Torch-Pruning's `history` on index-coded copies."""
    import torch_pruning as tp

    from compression_ops.channel_prune import quiet_unwrapped

    probes = {}
    for axis in ("out", "in"):
        probe = copy.deepcopy(original).eval()
        with torch.no_grad():
            for m in probe.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    shape = [1] * m.weight.dim()
                    dim = 0 if axis == "out" else 1
                    shape[dim] = m.weight.shape[dim]
                    idx = torch.arange(m.weight.shape[dim], dtype=m.weight.dtype).reshape(shape)
                    m.weight.copy_(idx.expand_as(m.weight))
        with quiet_unwrapped():
            graph = tp.DependencyGraph().build_dependency(probe, example)
            graph.load_pruning_history(history)
        probes[axis] = dict(probe.named_modules())
    out = {}
    for name, m in probes["out"].items():
        if isinstance(m, nn.Conv2d | nn.Linear):
            w_out, w_in = m.weight, probes["in"][name].weight
            first_in = (0,) * (w_out.dim() - 1)
            first_out = (0,) * (w_in.dim() - 2)
            keep_out = w_out[(slice(None), *first_in)].round().long()
            keep_in = w_in[(0, slice(None), *first_out)].round().long()
            out[name] = (keep_out, keep_in)
    return out


def _targets(original: nn.Module, pruned: nn.Module) -> list[str]:
    """Conv (groups=1) and linear layers of the pruned model whose inputs lost channels, in forward order."""
    before = dict(original.named_modules())
    names = []
    for name, m in pruned.named_modules():
        o = before.get(name)
        if isinstance(m, nn.Conv2d) and isinstance(o, nn.Conv2d) and m.groups == 1 and o.groups == 1:
            if m.in_channels < o.in_channels:
                names.append(name)
        elif isinstance(m, nn.Linear) and isinstance(o, nn.Linear) and m.in_features < o.in_features:
            names.append(name)
    return names


class _Captured(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of `layer` when `model` runs on x (the forward pass stops there)."""
    box: dict[str, torch.Tensor] = {}

    def hook(_m, inputs, _output):
        box["v"] = inputs[0].detach()
        raise _Captured

    h = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        h.remove()
    return box["v"]


def _rows_in(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's least-squares inputs, one row per output position: unfolded conv patches, or features."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (batch * positions, in * kh * kw)


def _rows_out(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _original_targets(original: nn.Module, layers: dict[str, nn.Module], keep: dict[str, torch.Tensor],
                      xs: list[torch.Tensor], positions: int, gen: torch.Generator) -> dict[tuple[str, int], tuple]:
    """One pass of the original per batch: for every layer to re-fit, the sampled output positions and the
    unpruned outputs there (at the kept channels). (name, batch) -> (positions, targets)."""
    out: dict[tuple[str, int], tuple] = {}
    current = {"i": 0}

    def hook_for(name: str):
        def hook(_m, _inputs, output):
            rows = _rows_out(layers[name], output.detach()).index_select(1, keep[name])
            pick = torch.randperm(rows.shape[0], generator=gen)[:positions] if rows.shape[0] > positions else None
            out[(name, current["i"])] = (pick, rows if pick is None else rows[pick])

        return hook

    handles = [layers[n].register_forward_hook(hook_for(n)) for n in layers]
    try:
        for i, x in enumerate(xs):
            current["i"] = i
            original(x)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def reconstruct(
    original: nn.Module,
    pruned: nn.Module,
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[torch.Tensor],
    *,
    positions_per_batch: int = 4096,
    ridge: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Re-fit, in place, the layers of `pruned` whose inputs lost channels. `batches`: input tensors
    (calibration images). Returns per layer the relative output error before and after its re-fit."""
    xs = [x for x in batches]
    if not xs:
        return {"layers": {}, "images": 0}
    was = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    gen = torch.Generator().manual_seed(seed)
    o_mods, p_mods = dict(original.named_modules()), dict(pruned.named_modules())
    names = [n for n in _targets(original, pruned)
             if (kept[n][0] if n in kept else torch.arange(p_mods[n].weight.shape[0])).numel() == p_mods[n].weight.shape[0]]
    keep = {n: kept[n][0] if n in kept else torch.arange(p_mods[n].weight.shape[0]) for n in names}
    report: dict[str, dict[str, float]] = {}
    try:
        targets = _original_targets(original, {n: o_mods[n] for n in names}, keep, xs, positions_per_batch, gen)
        for name in names:  # forward order: each layer sees the inputs the layers before it now give
            layer = p_mods[name]
            w0 = layer.weight.reshape(layer.weight.shape[0], -1).t().double()  # (in*k*k, out)
            if layer.bias is not None:
                w0 = torch.cat([w0, layer.bias.double()[None]], 0)
            gram = torch.zeros(w0.shape[0], w0.shape[0], dtype=torch.float64)
            cross = torch.zeros_like(w0)
            err0 = norm = 0.0
            for i, x in enumerate(xs):
                pick, b = targets[(name, i)]
                a = _rows_in(layer, _capture(pruned, layer, x))
                a = a if pick is None else a[pick]
                if layer.bias is not None:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
                a, b = a.double(), b.double()
                gram += a.t() @ a
                cross += a.t() @ b
                err0 += float(((a @ w0 - b) ** 2).sum())
                norm += float((b**2).sum())
            lam = ridge * float(gram.diagonal().mean()) + 1e-12
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            w = torch.linalg.solve(gram + lam * eye, cross + lam * w0)
            err1 = float((w * (gram @ w)).sum() - 2 * (w * cross).sum()) + norm  # ||Aw - b||^2, expanded
            if err1 >= err0:
                report[name] = {"error_before": (err0 / norm) ** 0.5, "error_after": (err0 / norm) ** 0.5,
                                "refit": False}
                continue
            if layer.bias is not None:
                layer.bias.copy_(w[-1].to(layer.bias.dtype))
                w = w[:-1]
            layer.weight.copy_(w.t().reshape(layer.weight.shape).to(layer.weight.dtype))
            report[name] = {"error_before": (err0 / norm) ** 0.5, "error_after": max(err1, 0.0) ** 0.5 / norm**0.5,
                            "refit": True}
    finally:
        original.train(was[0])
        pruned.train(was[1])
    return {"layers": report, "images": sum(int(x.shape[0]) for x in xs)}
