"""The shapes a compressed model has that its architecture's constructor would not give it, recorded per
module so a checkpoint rebuilds any pruned model: every parameter's and buffer's shape, dtype and kind,
and every structural attribute (ints, floats and tuples/lists of them in the module's own __dict__:
in_channels, groups, normalized_shape, num_heads, attention_head_size, ...).

Nothing here knows a layer type: a custom norm (transformers' ConvNextLayerNorm), a layer-scale vector,
a class token or a relative-position-bias table is resized like a Conv2d. Buffers that are not part of
the state_dict (non-persistent) cannot be filled by load_state_dict, so their values travel beside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tasks.errors import ModelLoadError

Structure = dict[str, dict[str, Any]]


def _structural(value: Any) -> bool:
    """An attribute value that can describe a shape: a number, or a flat tuple/list of numbers (no bools)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, tuple | list) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   for v in value)


def _attrs(m: nn.Module) -> dict[str, Any]:
    # Only the module's own plain attributes: private names, bools (`training`) and objects (a transformers
    # config, shared by every layer) are not shapes; the config's numbers are read at construction only.
    return {k: (tuple(v) if isinstance(v, torch.Size) else v) for k, v in vars(m).items()
            if not k.startswith("_") and _structural(v)}


def _tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def structure_of(model: nn.Module) -> Structure:
    """Per module: its parameters' and buffers' shapes and dtypes, and its structural attributes."""
    out: Structure = {}
    for name, m in model.named_modules():
        entry: dict[str, Any] = {}
        params = {k: {**_tensor_spec(p), "requires_grad": p.requires_grad}
                  for k, p in m._parameters.items() if p is not None}
        buffers = {k: {**_tensor_spec(b), "persistent": k not in m._non_persistent_buffers_set}
                   for k, b in m._buffers.items() if b is not None}
        attrs = _attrs(m)
        if params:
            entry["params"] = params
        if buffers:
            entry["buffers"] = buffers
        if attrs:
            entry["attrs"] = attrs
        if entry:
            out[name] = entry
    return out


def extra_buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-persistent buffers' values (load_state_dict does not restore them)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        for k, b in m._buffers.items():
            if b is not None and k in m._non_persistent_buffers_set:
                out[f"{name}.{k}" if name else k] = b.detach().cpu().clone()
    return out


def apply_structure(model: nn.Module, structure: Structure, extra_buffers: dict[str, torch.Tensor] | None = None
                    ) -> nn.Module:
    """Give each module its recorded attributes and empty tensors of its recorded shapes, in place; the
    weights are left for load_state_dict (strict) to fill. Tensors tied in the rebuilt model stay tied."""
    modules = dict(model.named_modules())
    replaced: dict[int, torch.Tensor] = {}  # id of the architecture's tensor -> its resized stand-in
    extra = extra_buffers or {}
    for name, entry in structure.items():
        m = modules.get(name)
        if m is None:
            raise ModelLoadError(f"checkpoint layer {name!r} does not exist in the rebuilt model; the checkpoint "
                                 "was written by a model of another architecture (check model.* in pipelines.yaml)")
        for k, v in entry.get("attrs", {}).items():
            setattr(m, k, v)
        for k in set(m._parameters) - set(entry.get("params", {})):
            m._parameters[k] = None  # the saved model had none there (e.g. a bias an op removed)
        for k in set(m._buffers) - set(entry.get("buffers", {})):
            m._buffers[k] = None
        for k, spec in entry.get("params", {}).items():
            old = m._parameters.get(k)
            new = replaced.get(id(old)) if old is not None else None
            if new is None:
                new = nn.Parameter(_empty(spec), requires_grad=spec["requires_grad"])
                if old is not None:
                    replaced[id(old)] = new
            m._parameters[k] = new
        for k, spec in entry.get("buffers", {}).items():
            full = f"{name}.{k}" if name else k
            old = m._buffers.get(k)
            new = replaced.get(id(old)) if old is not None else None
            if new is None:
                new = extra[full].clone() if full in extra else _empty(spec)
                if old is not None:
                    replaced[id(old)] = new
            m._buffers[k] = new
            if spec.get("persistent", True):
                m._non_persistent_buffers_set.discard(k)
            else:
                m._non_persistent_buffers_set.add(k)
    return model


def _empty(spec: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"checkpoint records a tensor of unknown dtype {spec['dtype']!r}; this torch cannot "
                             "load it (use the torch version that wrote it)")
    return torch.zeros(spec["shape"], dtype=dtype)


def apply_structure_v1(model: nn.Module, structure: dict[str, dict[str, int]]) -> nn.Module:
    """Format-1 checkpoints: only Conv2d/Linear/BatchNorm channel counts were recorded."""
    modules = dict(model.named_modules())
    for name, s in structure.items():
        m = modules.get(name)
        if m is None:
            raise ModelLoadError(f"checkpoint layer {name!r} does not exist in the rebuilt model")
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = s["in"], s["out"], s["groups"]
            m.weight = nn.Parameter(torch.empty(s["out"], s["in"] // s["groups"], *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(s["out"]))
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = s["in"], s["out"]
            m.weight = nn.Parameter(torch.empty(s["out"], s["in"]))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(s["out"]))
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = s["num_features"]
            m.num_features = n
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
            if m.track_running_stats:
                m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
    return model
