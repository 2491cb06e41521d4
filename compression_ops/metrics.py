"""Size and cost of a model: parameters, MACs, serialized bytes, sparsity."""

from __future__ import annotations

import io

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass at the example's batch size (Torch-Pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs)


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the state_dict as torch.save writes it: what a device would download."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among weights of conv and linear layers."""
    total = zeros = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            total += m.weight.numel()
            zeros += int((m.weight == 0).sum())
    return zeros / total if total else 0.0


def model_stats(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """params, MACs (per image), bytes, sparsity."""
    return {
        "params": count_params(model),
        "macs": count_macs(model, example[:1]),
        "bytes": serialized_bytes(model),
        "sparsity": round(sparsity(model), 6),
    }
