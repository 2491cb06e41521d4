"""Low-rank factorisation of conv and linear layers (truncated SVD, Tucker-2 by HOSVD).

A factorised layer becomes an nn.Sequential of plain Conv2d/Linear layers, so the model stays
traceable, exportable and prunable; tasks.models.checkpoint records such replacements.

- Linear(in, out) -> Linear(in, r, bias=False), Linear(r, out).
- Conv2d k x k (groups=1) -> Tucker-2: Conv1x1(in -> r_in) -> Conv kxk(r_in -> r_out; the original
  stride, padding, dilation) -> Conv1x1(r_out -> out, with the bias). The factors are the leading left
  singular vectors of the weight's output- and input-channel unfoldings (HOSVD); the core is the
  weight projected onto them, so full ranks reproduce the layer exactly.
- Conv2d 1x1 -> SVD split into two 1x1 convs (the first takes the stride and padding).
- Depthwise and other grouped convs are left alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from compression_ops.base import (
    OpConfig,
    OpConfigError,
    OpData,
    OpResult,
    check_range,
    forward_with_hooks,
    register_op,
)
from compression_ops.metrics import count_macs, count_params

LAYER_KINDS = ("conv", "linear", "all")


@dataclasses.dataclass
class LowRank(OpConfig):
    """Factorise conv/linear layers into thinner ones.

    energy: keep singular values until this fraction of the squared-singular-value energy (e.g. 0.9).
    rank_ratio: keep this fraction of the full rank. Set exactly one of energy and rank_ratio.
    per_layer: layer name -> value overriding energy (or rank_ratio, whichever is set) for that layer.
    min_params_saving: factorise a layer only if this saves at least this fraction of both its params
        and its MACs; None factorises every candidate, even where that grows it (tests, analysis).
    skip: layer names left alone. layers: which kinds are candidates, "conv", "linear" or "all".
    """

    op = "low_rank"
    energy: float | None = None
    rank_ratio: float | None = None
    per_layer: dict[str, float] | None = None
    min_params_saving: float | None = 0.1
    skip: list[str] = dataclasses.field(default_factory=list)
    layers: str = "all"

    def validate(self) -> None:
        if (self.energy is None) == (self.rank_ratio is None):
            raise OpConfigError(
                "set exactly one of energy (e.g. 0.9: keep 90% of the singular-value energy) and rank_ratio "
                f"(e.g. 0.25 of the full rank); got energy={self.energy!r}, rank_ratio={self.rank_ratio!r}"
            )
        key = "energy" if self.energy is not None else "rank_ratio"
        check_range(key, self.criterion, 0.0, 1.0, lo_open=True)
        for name, v in (self.per_layer or {}).items():
            check_range(f"per_layer[{name!r}] ({key})", v, 0.0, 1.0, lo_open=True)
        if self.min_params_saving is not None:
            check_range("min_params_saving", self.min_params_saving, 0.0, 1.0, hi_open=True)
        if self.layers not in LAYER_KINDS:
            raise OpConfigError(f"layers={self.layers!r}: expected one of {', '.join(LAYER_KINDS)}")

    @property
    def criterion(self) -> float:
        return self.energy if self.energy is not None else self.rank_ratio  # type: ignore[return-value]


def rank_for(singular_values: torch.Tensor, *, energy: float | None = None, rank_ratio: float | None = None) -> int:
    """Smallest rank keeping `energy` of sum(s^2), or ceil(rank_ratio * full rank); at least 1."""
    full = singular_values.numel()
    if rank_ratio is not None:
        return max(1, min(full, math.ceil(rank_ratio * full - 1e-9)))
    assert energy is not None
    e = singular_values.double() ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return max(1, min(full, int((cum < energy - 1e-12).sum()) + 1))


def _leading_vectors(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of a 2-D matrix (float64 for a clean full-rank case)."""
    u, s, _ = torch.linalg.svd(mat.double(), full_matrices=False)
    return u, s


def factorise_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Truncated SVD: W ~ (U_r S_r) V_r^T as Linear(in, r, no bias) then Linear(r, out, bias)."""
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    dtype = layer.weight.dtype
    with torch.no_grad():
        first.weight.copy_(vh[:rank].to(dtype))
        second.weight.copy_((u[:, :rank] * s[:rank]).to(dtype))
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def factorise_pointwise(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """SVD of a 1x1 conv: Conv1x1(in -> r; the stride, padding) then Conv1x1(r -> out, bias)."""
    w = conv.weight.detach().double().flatten(1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = nn.Conv2d(conv.in_channels, rank, 1, conv.stride, conv.padding, conv.dilation, bias=False,
                      padding_mode=conv.padding_mode)
    second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
    dtype = conv.weight.dtype
    with torch.no_grad():
        first.weight.copy_(vh[:rank].to(dtype)[:, :, None, None])
        second.weight.copy_((u[:, :rank] * s[:rank]).to(dtype)[:, :, None, None])
        if conv.bias is not None:
            second.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, second)


def tucker2_factors(conv: nn.Conv2d) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """HOSVD of a conv weight (out, in, k, k): ((U_out, s_out), (U_in, s_in)), float64."""
    w = conv.weight.detach().double()
    out_c, in_c = w.shape[:2]
    u_out, s_out = _leading_vectors(w.reshape(out_c, -1))
    u_in, s_in = _leading_vectors(w.transpose(0, 1).reshape(in_c, -1))
    return (u_out, s_out), (u_in, s_in)


def factorise_conv_tucker2(conv: nn.Conv2d, r_in: int, r_out: int) -> nn.Sequential:
    """Tucker-2: W ~ G x_out U_out x_in U_in as Conv1x1(in->r_in), Conv kxk(r_in->r_out), Conv1x1(r_out->out)."""
    (u_out, _), (u_in, _) = tucker2_factors(conv)
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    w = conv.weight.detach().double()
    core = torch.einsum("oikl,oa,ib->abkl", w, u_out, u_in)
    # A 1x1 channel mix commutes with zero/reflect/replicate padding, so only the core needs it.
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
    mid = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                    padding_mode=conv.padding_mode)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)
    dtype = conv.weight.dtype
    with torch.no_grad():
        first.weight.copy_(u_in.T.to(dtype)[:, :, None, None])
        mid.weight.copy_(core.to(dtype))
        last.weight.copy_(u_out.to(dtype)[:, :, None, None])
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, mid, last)


def _not_candidate(m: nn.Module, kinds: str) -> str | None:
    """Why low_rank leaves a Conv2d/Linear alone by its kind, or None when it is a candidate."""
    if isinstance(m, nn.Linear) and kinds == "conv":
        return "not selected: layers='conv'"
    if isinstance(m, nn.Conv2d):
        if kinds == "linear":
            return "not selected: layers='linear'"
        if m.groups != 1:
            return "grouped conv (depthwise or grouped: no low-rank form)"
    return None


def _positions(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(input, output) positions per layer at the example's size: batch x pixels for a conv, batch x
    tokens for a linear. A layer's MACs are its weights times the positions it runs at."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, int]] = {}
    hooks = {}
    for n in names:
        ch = -3 if isinstance(modules[n], nn.Conv2d) else -1

        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, n: str = n, ch: int = ch) -> None:
            seen[n] = (inp[0].numel() // inp[0].shape[ch], out.numel() // out.shape[ch])

        hooks[modules[n]] = hook
    forward_with_hooks(model, example, hooks)
    return seen


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _macs(layer: nn.Module, pos_in: int, pos_out: int) -> int:
    """MACs of a layer or of its factorised Sequential at the given positions."""
    if not isinstance(layer, nn.Sequential):
        return layer.weight.numel() * pos_out
    parts = list(layer)
    # The Tucker-2 input projection runs before the strided core, at the input resolution.
    first_pos = pos_in if len(parts) == 3 else pos_out
    return parts[0].weight.numel() * first_pos + sum(m.weight.numel() for m in parts[1:]) * pos_out


def _factorise(m: nn.Module, value: float, cfg: LowRank) -> tuple[nn.Sequential, list[int], str]:
    by = {"energy": value} if cfg.energy is not None else {"rank_ratio": value}
    if isinstance(m, nn.Linear):
        s = torch.linalg.svdvals(m.weight.detach().double())
        r = rank_for(s, **by)
        return factorise_linear(m, r), [r], "svd"
    if m.kernel_size == (1, 1):
        s = torch.linalg.svdvals(m.weight.detach().double().flatten(1))
        r = rank_for(s, **by)
        return factorise_pointwise(m, r), [r], "svd"
    (_, s_out), (_, s_in) = tucker2_factors(m)
    r_in, r_out = rank_for(s_in, **by), rank_for(s_out, **by)
    return factorise_conv_tucker2(m, r_in, r_out), [r_in, r_out], "tucker2"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@register_op(LowRank)
def low_rank(model: nn.Module, cfg: LowRank, data: OpData) -> OpResult:
    """Factorise a copy of `model`; the original is left untouched."""
    if not isinstance(data, OpData):
        raise OpConfigError("low_rank needs OpData(example=<input tensor>) to count MACs")
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    unknown = [n for n in list(cfg.skip) + list(cfg.per_layer or {}) if n not in modules]
    if unknown:
        raise OpConfigError(f"layer name(s) {unknown} not in the model; names look like {list(modules)[1:4]}")
    macs0, params0 = count_macs(model, data.example), count_params(model)
    skipped: dict[str, str] = {}
    names = []
    for n, m in modules.items():
        if not n or not isinstance(m, nn.Conv2d | nn.Linear):
            continue
        why = "in skip" if n in cfg.skip else _not_candidate(m, cfg.layers)
        if why:
            skipped[n] = why
        else:
            names.append(n)
    positions = _positions(model, names, data.example)
    per_layer: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in positions:
            skipped[name] = "not run by the forward pass"
            continue
        m = modules[name]
        new, ranks, kind = _factorise(m, (cfg.per_layer or {}).get(name, cfg.criterion), cfg)
        pos_in, pos_out = positions[name]
        p0, p1 = _params(m), _params(new)
        c0, c1 = _macs(m, pos_in, pos_out), _macs(new, pos_in, pos_out)
        if cfg.min_params_saving is not None:
            saving = min(1 - p1 / p0, 1 - c1 / max(c0, 1))
            if saving < cfg.min_params_saving:
                skipped[name] = (f"below min_params_saving (ranks {ranks} save {saving:.0%} < "
                                 f"{cfg.min_params_saving:.0%})")
                continue
        _set_module(model, name, new)
        per_layer[name] = {
            "kind": kind, "ranks": ranks, "params_before": p0, "params_after": p1, "macs_before": c0, "macs_after": c1
        }
    macs1, params1 = count_macs(model, data.example), count_params(model)
    return OpResult(
        model,
        {
            "op": cfg.op,
            "layers_factorised": len(per_layer),
            "macs_before": macs0,
            "macs_after": macs1,
            "macs_reduction": macs0 / max(macs1, 1),
            "params_before": params0,
            "params_after": params1,
            "params_reduction": params0 / max(params1, 1),
            "per_layer": per_layer,
            "applied": list(per_layer),
            "skipped": skipped,
        },
    )
