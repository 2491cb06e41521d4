"""Which layers a plan's ops changed, which they left alone and why, and how much of the model's compute
that covers: one row per layer with weights, one status per op.

MACs per layer are count_macs' figures (Torch-Pruning's counter, per module): a conv or linear layer's
multiply-accumulates plus its bias adds, a norm's 1-2 operations per element, at the example's batch
size. Matrix products a model computes functionally rather than in a module (attention's Q·K^T and
weights·V, in a ViT or Swin block) are invisible to that counter; they are measured separately with
torch's FlopCounterMode (everything it counts outside leaf modules, halved to MACs) and reported as
`functional_macs`. They count in the total and never as covered: no op of ours has them as a layer
(pruning heads shrinks them, but only as a side effect of changing the projections).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compression_ops.base import param_layers

APPLIED = "applied"
NOT_CANDIDATE = "not a candidate"
SKIPPED = "skipped: "  # then the op's reason
REVERTED = "reverted: "  # then why the op was undone
UNREPORTED = "not reported: the op's report lists no layers"


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """count_macs' MACs per module the counter knows (conv, linear, norms, ...); others are absent."""
    import torch_pruning as tp
    from torch_pruning.utils.op_counter import is_supported_instance

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, _, per_module, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    finally:
        model.train(was_training)
    return {m: int(v or 0) for m, v in per_module.items() if is_supported_instance(m)}


def _sdpa_flops(query: Any, key: Any, value: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    """FlopCounterMode formula for CPU's fused attention, which torch does not register (args are shapes)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def functional_macs(model: nn.Module, example: torch.Tensor, counted: set[nn.Module]) -> int:
    """MACs of matrix products run outside leaf modules and outside `counted` ones (attention), by
    FlopCounterMode (scaled-dot-product attention on CPU included)."""
    from torch.utils import flop_counter

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:
        mapping[cpu_sdpa] = _sdpa_flops
    was_training = model.training
    model.eval()
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as fc, torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    root = type(model).__name__
    inside = 0
    done: list[str] = []  # names whose whole subtree is already subtracted
    for name, m in model.named_modules():
        if not name or any(name.startswith(d + ".") for d in done):
            continue
        if m in counted or next(m.children(), None) is None:
            inside += counts.get(f"{root}.{name}", 0)
            done.append(name)
    return max(0, (counts.get("Global", 0) - inside) // 2)


def _status(layer: str, report: dict[str, Any]) -> str:
    """The layer's status under one op: its own name first, then a module around it, then a part of it
    (a factorised layer's pieces, `fc.0` and `fc.1`, belong to `fc`)."""
    if report.get("reverted"):
        return REVERTED + str(report["reverted"])
    if "applied" not in report:
        return UNREPORTED
    skipped, applied = report.get("skipped") or {}, set(report.get("applied") or [])
    for related in (
        lambda n: n == layer,
        lambda n: bool(n) and layer.startswith(n + "."),
        lambda n: n.startswith(layer + "." if layer else ""),
    ):
        for name, why in skipped.items():
            if related(name):
                return SKIPPED + str(why)
        if any(related(n) for n in applied):
            return APPLIED
    return NOT_CANDIDATE


def coverage(model: nn.Module, example: torch.Tensor, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-layer table of what a plan's ops did to `model` (the model before the plan), JSON-able.

    reports: the op reports in plan order (each with `op`, `applied`, `skipped`, and `reverted` when the
        op was undone); an op whose report has no `applied` list shows "not reported" on every layer.
        Names are the ones the op saw; a name inside a layer (a factorised layer's parts) counts for
        that layer.

    Returns {"ops": [op names], "layers": {name: {"type", "params", "macs", "ops": {op: status}}},
    "reverted": {op: why}, "layer_macs", "functional_macs", "macs_total", "macs_covered", "macs_covered_fraction"}, where a
    status is "applied", "skipped: why", "reverted: why", "not a candidate" (the op never looks at
    such a layer, e.g. a LayerNorm for sparsity) or "not reported: ...". A layer an op reports under two names (skipped by
    one, applied by another) shows as skipped.

    macs_covered_fraction = macs_covered / macs_total, where macs_covered is the MACs of the layers at
    least one op applied to (its status "applied"; reverted ops count as not applied), and macs_total
    is every listed layer's MACs plus functional_macs (see the module docstring). A layer's MACs are
    those of the model before the plan, so a layer pruned to half counts whole: the figure says how
    much of the original compute the plan reached, not how much it removed.
    """
    ops: dict[str, dict[str, Any]] = {}  # by a unique key: the op's name, then name#2, name#3 for repeats
    for r in reports:
        key, n = str(r.get("op", "op")), 1
        while key in ops:
            n += 1
            key = f"{r.get('op', 'op')}#{n}"
        ops[key] = r
    per_module = layer_macs(model, example)
    layers: dict[str, dict[str, Any]] = {}
    for name, m in param_layers(model).items():
        layers[name or "(model)"] = {
            "type": type(m).__name__,
            "params": sum(p.numel() for p in m.parameters(recurse=False)),
            "macs": per_module.get(m, 0),  # 0 for a module whose compute its listed children hold
            "ops": {key: _status(name, r) for key, r in ops.items()},
        }
    counted = {m for m in per_module if per_module[m]}
    extra = functional_macs(model, example, counted)
    in_layers = sum(row["macs"] for row in layers.values())
    covered = sum(row["macs"] for row in layers.values() if APPLIED in row["ops"].values())
    total = in_layers + extra
    return {
        "ops": list(ops),
        "reverted": {key: r["reverted"] for key, r in ops.items() if r.get("reverted")},
        "layers": layers,
        "layer_macs": in_layers,
        "functional_macs": extra,
        "macs_total": total,
        "macs_covered": covered,
        "macs_covered_fraction": covered / total if total else 0.0,
    }


def skipped_by_reason(cov: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """{op: {reason: [layers]}} of a coverage table's skipped layers (a reverted op is in cov["reverted"]);
    a reason is grouped up to its first " (" so per-layer details (ranks, channel counts) do not split
    the groups."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, row in cov["layers"].items():
        for op, status in row["ops"].items():
            if status.startswith(SKIPPED):
                out.setdefault(op, {}).setdefault(status[len(SKIPPED):].split(" (", 1)[0], []).append(name)
    return out
