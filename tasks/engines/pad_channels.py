"""Pad a pruned model's channel counts up to a multiple of the vector width, exactly.

Channel pruning leaves widths such as 11, 22 or 45. A compiled CPU kernel vectorizes the output
channel: with 8-float registers (AVX2), 11 channels is one full register and a 3-lane tail, and TVM's
code for that tail ran 10-30x slower per MAC than for 8 or 16 channels here (bench/engines.py). So
before compiling, every coupled group of channels (a conv's outputs, the BN after it, the next
layers' inputs, everything a residual add ties to them) is widened to the next multiple of `multiple`
with channels that are exactly zero:

* a conv or linear producing the group gets zero filters (and zero bias);
* a batch norm gets weight 0, bias 0, mean 0, var 1, so the new channels stay 0 after it;
* every layer consuming the group gets zero weights for the new input channels.

Activations after BN see 0 (ReLU(0) = 0); whatever an activation makes of 0, the consumers' zero
weights drop it, so the logits are those of the original model. This is checked on a random batch;
a model the rules do not cover (a parametric layer type not listed, a mismatch) is returned unpadded.
The deployed weights (packed, ONNX) are not padded: this is only the compiled engine's layout.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _grow(p: torch.Tensor, dim: int, extra: int, fill: float = 0.0) -> nn.Parameter | torch.Tensor:
    shape = list(p.shape)
    shape[dim] = extra
    grown = torch.cat([p.detach(), torch.full(shape, fill, dtype=p.dtype)], dim=dim)
    return nn.Parameter(grown, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else grown


def _conv_out(m: nn.Conv2d, extra: int) -> None:
    m.weight = _grow(m.weight, 0, extra)
    if m.bias is not None:
        m.bias = _grow(m.bias, 0, extra)
    m.out_channels += extra


def _conv_in(m: nn.Conv2d, extra: int) -> None:
    m.weight = _grow(m.weight, 1, extra)
    m.in_channels += extra


def _depthwise(m: nn.Conv2d, extra: int) -> None:
    _conv_out(m, extra)
    m.in_channels += extra
    m.groups += extra


def _bn(m: nn.BatchNorm2d | nn.BatchNorm1d, extra: int) -> None:
    if m.affine:
        m.weight = _grow(m.weight, 0, extra, 0.0)
        m.bias = _grow(m.bias, 0, extra, 0.0)
    if m.running_mean is not None:
        m.running_mean = _grow(m.running_mean, 0, extra, 0.0)
        m.running_var = _grow(m.running_var, 0, extra, 1.0)
    m.num_features += extra


def _linear_in(m: nn.Linear, extra: int) -> None:
    m.weight = _grow(m.weight, 1, extra)
    m.in_features += extra


def _handlers() -> dict[Any, Any]:
    import torch_pruning as tp

    # Batch norm and depthwise convs have one handler for both sides (in == out in torch-pruning).
    return {
        tp.prune_conv_out_channels: _conv_out,
        tp.prune_conv_in_channels: _conv_in,
        tp.prune_depthwise_conv_out_channels: _depthwise,
        tp.prune_batchnorm_out_channels: _bn,
        tp.prune_linear_in_channels: _linear_in,
    }


def pad_channels(model: nn.Module, example: torch.Tensor, multiple: int, *, atol: float = 1e-4) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of model with every prunable channel group widened to a multiple of `multiple`.

    Returns (model, report). The report lists each group's width before and after, the MACs added,
    and the max abs difference of the logits on a random batch; with any problem the original model
    comes back unchanged and the report says why.
    """
    import torch_pruning as tp

    from compression_ops.channel_prune import output_layers

    report: dict[str, Any] = {"multiple": multiple, "groups": [], "padded": False}
    if multiple <= 1:
        return model, {**report, "reason": "multiple <= 1"}
    padded = copy.deepcopy(model).eval()
    handlers = _handlers()
    names = {m: n for n, m in padded.named_modules()}
    try:
        graph = tp.DependencyGraph().build_dependency(padded, example)
        groups = list(graph.get_all_groups(ignored_layers=output_layers(padded, example),
                                           root_module_types=[nn.Conv2d]))
    except Exception as e:  # a graph torch-pruning cannot trace: compile as is
        return model, {**report, "reason": f"dependency graph failed: {type(e).__name__}: {e}"}
    plan = []
    for g in groups:
        root = g[0][0].target.module
        width = root.out_channels
        extra = -width % multiple
        if extra == 0:
            continue
        steps = []
        for dep, _ in g:
            module = dep.target.module
            if dep.handler in handlers:
                steps.append((handlers[dep.handler], module))
            elif isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
                return model, {**report, "reason": f"{names.get(module, module)}: no padding rule for {dep.handler}"}
        plan.append((names[root], width, extra, steps))
    if not plan:
        return model, {**report, "reason": f"every width is already a multiple of {multiple}"}
    done: set[tuple[int, Any]] = set()
    for root, width, extra, steps in plan:
        for fn, module in steps:
            if (id(module), fn) in done:  # a module listed twice in one group (e.g. both residual sides)
                continue
            done.add((id(module), fn))
            fn(module, extra)
        report["groups"].append({"root": root, "from": width, "to": width + extra})
    with torch.inference_mode():
        x = torch.randn(max(2, example.shape[0]), *example.shape[1:], generator=torch.Generator().manual_seed(0))
        ref, out = model.eval()(x), padded(x)
    diff = float((ref - out).abs().max())
    report["max_abs_diff"] = diff
    if not diff <= atol:
        log.warning("channel padding changed the logits by %.3g; compiling unpadded", diff)
        return model, {**report, "groups": [], "reason": f"padded logits differ by {diff:.3g}"}
    report["padded"] = True
    return padded, report
