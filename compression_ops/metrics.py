"""Size and cost of a model: parameters, MACs, serialized bytes, sparsity, weight bits."""

from __future__ import annotations

import io

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass at the example's batch size (Torch-Pruning's counter, by
    layer). A model whose compute is in no layer it knows (a torch.export graph of aten ops) is counted by
    torch's FLOP counter instead: half its FLOPs."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example)
        if not macs:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                model(example)
            macs = counter.get_total_flops() // 2
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


def weight_bits(model: nn.Module) -> float:
    """Mean bits per conv/linear weight: a layer quantized or clustered by an op says so in `weight_bits`;
    any other layer counts as 32-bit float."""
    total = bits = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and (isinstance(m, nn.Conv2d | nn.Linear) or hasattr(m, "weight_bits")):
            n = w.numel()
            total += n
            bits += n * int(getattr(m, "weight_bits", 32))
    return bits / total if total else 32.0


def model_stats(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """params, MACs (per image), bytes, sparsity, mean weight bits."""
    return {
        "params": count_params(model),
        "macs": count_macs(model, example[:1]),
        "bytes": serialized_bytes(model),
        "sparsity": round(sparsity(model), 6),
        "weight_bits": round(weight_bits(model), 3),
    }
