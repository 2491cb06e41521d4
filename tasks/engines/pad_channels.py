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

Activations after BN see 0 (ReLU(0) = 0); whatever an activation makes of 0 (sigmoid: 0.5 in a
squeeze-excitation gate), the consumers' zero weights drop it, or it multiplies a zero channel, so the
logits are those of the original model.

Grouped convolutions (groups=g, not depthwise) keep their groups: the width becomes a multiple of
both `multiple` and g, and the new channels go at the end of each of the g blocks, so every original
channel stays in its group (channel i of block j moves to j * new_block + i). Depthwise convolutions
grow their groups with their channels. A group whose channels pass through an op that moves channel
indices (concatenation, split, reshape, slicing), a grouped conv whose groups disagree with another's
in the same group, or a parametric layer without a rule (LayerNorm, a layer-scale parameter, PReLU)
is declined and keeps its width; the rest are padded.

Padding never raises: any failure (tracing, an unexpected layer, a shape mismatch) returns the model
unpadded, with the reason in the report and the log. The logits on a random batch decide at the end.
The deployed weights (packed, ONNX) are not padded: this is only the compiled engine's layout.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _scatter(p: torch.Tensor, dim: int, pos: torch.Tensor, width: int, fill: float = 0.0) -> nn.Parameter | torch.Tensor:
    """p with dim widened to `width`: old index i at pos[i], every other index `fill`."""
    shape = list(p.shape)
    shape[dim] = width
    grown = torch.full(shape, fill, dtype=p.dtype).index_copy(dim, pos, p.detach())
    return nn.Parameter(grown, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else grown


class _Layout:
    """Where a group's old channels go: `pos[i]` in a width of `width`, in `blocks` equal blocks."""

    def __init__(self, width: int, multiple: int, blocks: int):
        self.old, self.blocks = width, blocks
        step = math.lcm(multiple, blocks)
        self.width = -(-width // step) * step
        old_block, new_block = width // blocks, self.width // blocks
        self.pos = torch.tensor([(i // old_block) * new_block + i % old_block for i in range(width)])
        # A grouped conv's input slice per group: its old channels first, then zeros.
        self.in_block = (torch.arange(old_block), new_block)


def _conv_out(m: nn.Conv2d, lay: _Layout) -> None:
    m.weight = _scatter(m.weight, 0, lay.pos, lay.width)
    if m.bias is not None:
        m.bias = _scatter(m.bias, 0, lay.pos, lay.width)
    m.out_channels = lay.width


def _conv_in(m: nn.Conv2d, lay: _Layout) -> None:
    if m.groups == 1:
        m.weight = _scatter(m.weight, 1, lay.pos, lay.width)
    else:  # grouped: each group's input slice grows by the zeros that block got
        pos, per_group = lay.in_block
        m.weight = _scatter(m.weight, 1, pos, per_group)
    m.in_channels = lay.width


def _depthwise(m: nn.Conv2d, lay: _Layout) -> None:
    _conv_out(m, lay)
    m.in_channels = m.groups = lay.width


def _bn(m: nn.BatchNorm2d | nn.BatchNorm1d, lay: _Layout) -> None:
    if m.affine:
        m.weight = _scatter(m.weight, 0, lay.pos, lay.width, 0.0)
        m.bias = _scatter(m.bias, 0, lay.pos, lay.width, 0.0)
    if m.running_mean is not None:
        m.running_mean = _scatter(m.running_mean, 0, lay.pos, lay.width, 0.0)
        m.running_var = _scatter(m.running_var, 0, lay.pos, lay.width, 1.0)
    m.num_features = lay.width


def _linear_in(m: nn.Linear, lay: _Layout) -> None:
    m.weight = _scatter(m.weight, 1, lay.pos, lay.width)
    m.in_features = lay.width


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


def _index_moving_ops() -> tuple[type, ...]:
    """Torch-Pruning's stand-ins for ops that map channel indices (appending zeros would misplace them)."""
    from torch_pruning import ops

    return tuple(getattr(ops, n) for n in ("_ConcatOp", "_SplitOp", "_UnbindOp", "_SliceOp",
                                           "_ExpandOp", "_CustomizedOp") if hasattr(ops, n))


def _plan_group(group: Any, width: int, names: dict[Any, str], handlers: dict[Any, Any],
                moving: tuple[type, ...], reshape: type) -> tuple[list, int] | str:
    """(steps, blocks) that pad one torch-pruning group, or why it is declined."""
    steps, blocks, flattened = [], {1}, False
    for dep, _ in group:
        module = dep.target.module
        name = names.get(module, type(module).__name__)
        if isinstance(module, reshape):
            flattened = True
            continue
        if isinstance(module, moving):
            return f"{name}: {type(module).__name__.strip('_')} moves channel indices"
        if dep.handler not in handlers:
            if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
                return f"{name}: no padding rule for {getattr(dep.handler, '__name__', dep.handler)}"
            if isinstance(module, nn.Parameter):
                return f"{name}: no padding rule for a bare parameter (e.g. a layer scale)"
            continue
        fn = handlers[dep.handler]
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            if fn is _depthwise:
                if not module.in_channels == module.out_channels == module.groups:
                    return f"{name}: depthwise conv with a channel multiplier"
            else:
                blocks.add(module.groups)
        steps.append((fn, module))
    # A flatten before the classifier keeps channel order when the map is 1x1 (in_features == width);
    # any other reshape (patches, heads) may move channels.
    linears = [m for fn, m in steps if fn is _linear_in]
    if flattened and (not linears or any(m.in_features != width for m in linears)):
        return "a reshape of the channels that is not a flatten of a 1x1 map into a linear layer"
    if len(blocks - {1}) > 1:
        return f"grouped convs with different groups {sorted(blocks - {1})} share one channel group"
    return steps, max(blocks)


def pad_channels(model: nn.Module, example: torch.Tensor, multiple: int, *, atol: float = 1e-4) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of model with every prunable channel group widened to a multiple of `multiple`.

    Returns (model, report). The report lists each padded group's width before and after, the groups
    declined and why, and the max abs difference of the logits on a random batch. Never raises: with
    any problem the original model comes back unchanged and report["reason"] says why.
    """
    report: dict[str, Any] = {"multiple": multiple, "groups": [], "declined": [], "padded": False}
    if multiple <= 1:
        return model, {**report, "reason": "multiple <= 1"}
    try:
        return _pad(model, example, multiple, atol, report)
    except Exception as e:  # padding is an optimization: a failure compiles the model as it is
        reason = f"padding failed: {type(e).__name__}: {str(e)[:300]}"
        log.warning("channel padding skipped (%s); compiling unpadded", reason)
        return model, {**report, "groups": [], "reason": reason}


def _pad(model: nn.Module, example: torch.Tensor, multiple: int, atol: float, report: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import torch_pruning as tp

    from compression_ops.channel_prune import output_layers

    padded = copy.deepcopy(model).eval()
    handlers, moving = _handlers(), _index_moving_ops()
    names = {m: n for n, m in padded.named_modules()}
    try:
        from compression_ops.channel_prune import quiet_unwrapped

        with quiet_unwrapped():
            graph = tp.DependencyGraph().build_dependency(padded, example)
        groups = list(graph.get_all_groups(ignored_layers=output_layers(padded, example),
                                           root_module_types=[nn.Conv2d]))
    except Exception as e:  # a graph torch-pruning cannot trace: compile as is
        return model, {**report, "reason": f"dependency graph failed: {type(e).__name__}: {str(e)[:300]}"}
    plan = []
    for g in groups:
        root = g[0][0].target.module
        width = root.out_channels
        planned = _plan_group(g, width, names, handlers, moving, tp.ops._ReshapeOp)
        if isinstance(planned, str):
            if width % multiple:
                report["declined"].append({"root": names.get(root, "?"), "width": width, "reason": planned})
            continue
        steps, blocks = planned
        lay = _Layout(width, multiple, blocks)
        if lay.width != width:
            plan.append((names[root], lay, steps))
    if not plan:
        why = "; ".join(d["reason"] for d in report["declined"][:3])
        return model, {**report, "reason": f"no group padded: {why}" if why
                       else f"every width is already a multiple of {multiple}"}
    done: set[tuple[int, Any]] = set()
    for root, lay, steps in plan:
        for fn, module in steps:
            if (id(module), fn) in done:  # a module listed twice in one group (e.g. both residual sides)
                continue
            done.add((id(module), fn))
            fn(module, lay)
        report["groups"].append({"root": root, "from": lay.old, "to": lay.width,
                                 **({"blocks": lay.blocks} if lay.blocks > 1 else {})})
    with torch.inference_mode():
        x = torch.randn(max(2, example.shape[0]), *example.shape[1:], generator=torch.Generator().manual_seed(0))
        ref, out = model.eval()(x), padded(x)
    ref, out = (t[0] if isinstance(t, tuple | list) else t for t in (ref, out))
    diff = float((ref - out).abs().max())
    report["max_abs_diff"] = diff
    if not diff <= atol:
        log.warning("channel padding changed the logits by %.3g; compiling unpadded", diff)
        return model, {**report, "groups": [], "reason": f"padded logits differ by {diff:.3g}"}
    if report["declined"]:
        log.info("channel padding declined %d groups: %s", len(report["declined"]), report["declined"])
    report["padded"] = True
    return padded, report
