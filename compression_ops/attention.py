"""Multi-head attention modules found by duck typing, so channel pruning removes whole heads.

No transformers or timm import: a module is attention when it has the projections and the head counts
of one of the common implementations:
- Hugging Face (BERT-style): Linear children query / key / value, ints num_attention_heads,
  attention_head_size, all_head_size (MobileViT, BERT-likes, older ViT / DeiT / Swin);
- Hugging Face (current): Linear children q_proj / k_proj / v_proj, ints num_attention_heads, head_dim
  (ViT, DeiT, Swin in transformers 5);
- timm: a fused `qkv` Linear (q, k, v stacked on its outputs), int num_heads (head_dim optional).
torch's nn.MultiheadAttention is left to Torch-Pruning's own handler, which narrows its embedding evenly
across the heads rather than removing heads.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

# Per-head parameters Torch-Pruning cannot follow (they are indexed by head, not by a channel of a
# layer it traces), by attribute name -> the dimension that counts heads. Swin: [positions, heads].
PER_HEAD_PARAMS = {"relative_position_bias_table": -1}


@dataclasses.dataclass
class Attention:
    """One attention module: its projections (q, k, v; one fused qkv for timm) and head geometry."""

    name: str
    module: nn.Module
    projections: tuple[nn.Linear, ...]
    heads_attr: str  # the int attribute forward() reads the head count from
    head_dim: int
    per_head: dict[str, tuple[nn.Module, str, int]]  # qualified name -> (owner, attribute, head dim)

    @property
    def fused(self) -> bool:
        return len(self.projections) == 1

    @property
    def heads(self) -> int:
        """Heads as the projections' widths say (what forward will see)."""
        width = self.projections[0].out_features // (3 if self.fused else 1)
        return width // self.head_dim


def _int(module: nn.Module, attr: str) -> int | None:
    v = getattr(module, attr, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _linears(module: nn.Module, names: tuple[str, ...]) -> tuple[nn.Linear, ...] | None:
    found = tuple(getattr(module, n, None) for n in names)
    return found if all(isinstance(m, nn.Linear) for m in found) else None


def _as_attention(name: str, m: nn.Module) -> Attention | None:
    heads = _int(m, "num_attention_heads")
    for names, dim_attr in ((("query", "key", "value"), "attention_head_size"), (("q_proj", "k_proj", "v_proj"), "head_dim")):
        proj = _linears(m, names)
        if proj and heads:
            head_dim = _int(m, dim_attr) or proj[0].out_features // heads
            if all(p.out_features == heads * head_dim for p in proj):
                return Attention(name, m, proj, "num_attention_heads", head_dim, {})
    heads = _int(m, "num_heads")
    qkv = _linears(m, ("qkv",))
    if qkv and heads and qkv[0].out_features % (3 * heads) == 0:
        head_dim = _int(m, "head_dim") or qkv[0].out_features // (3 * heads)
        if qkv[0].out_features == 3 * heads * head_dim:
            return Attention(name, m, qkv, "num_heads", head_dim, {})
    return None


def find_attention(model: nn.Module) -> list[Attention]:
    """Every attention module of `model` whose heads can be removed whole, in module order."""
    found = []
    for name, m in model.named_modules():
        att = _as_attention(name, m)
        if att is None:
            continue
        for sub_name, sub in m.named_modules():
            for p_name, p in sub.named_parameters(recurse=False):
                dim = PER_HEAD_PARAMS.get(p_name)
                if dim is not None and p.dim() > 0 and p.shape[dim] == att.heads:
                    qual = ".".join(x for x in (name, sub_name, p_name) if x)
                    att.per_head[qual] = (sub, p_name, dim)
        found.append(att)
    return found


def heads_to_remove(heads: int, ratio: float) -> int:
    """Heads a layer ratio removes: the nearest whole number, at least one head kept."""
    return max(0, min(heads - 1, round(ratio * heads)))


def head_ratio(heads: int, ratio: float) -> float:
    """The head_pruning_ratio under which Torch-Pruning (it rounds ratio * heads up) removes
    heads_to_remove(heads, ratio) heads."""
    k = heads_to_remove(heads, ratio)
    return 0.0 if k == 0 else (k - 0.5) / heads


def removed_heads(att: Attention, out_idxs: list[int]) -> list[int]:
    """The heads whose channels `out_idxs` (pruned outputs of one of att's projections) are."""
    width = att.heads * att.head_dim
    return sorted({(i % width) // att.head_dim for i in out_idxs})


def drop_per_head_params(att: Attention, heads: list[int], n_heads: int) -> None:
    """Remove `heads` (of n_heads) from the per-head parameters Torch-Pruning does not see."""
    keep = torch.tensor([h for h in range(n_heads) if h not in set(heads)], dtype=torch.long)
    for owner, attr, dim in att.per_head.values():
        p = getattr(owner, attr)
        if p.shape[dim] != n_heads:
            continue  # already done (the same group seen twice)
        with torch.no_grad():
            kept = p.detach().index_select(dim % p.dim(), keep).clone()
        setattr(owner, attr, nn.Parameter(kept, requires_grad=p.requires_grad))


def sync_attributes(att: Attention) -> None:
    """Make the head counts forward() reads match the pruned projections (and what a checkpoint records)."""
    heads = att.heads
    setattr(att.module, att.heads_attr, heads)
    if _int(att.module, "all_head_size") is not None:
        att.module.all_head_size = heads * att.head_dim


def sync_torch_mha(model: nn.Module) -> None:
    """torch's MultiheadAttention after Torch-Pruning narrowed it: its head_dim attribute follows embed_dim."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.head_dim = m.embed_dim // m.num_heads
            m.kdim, m.vdim = (m.embed_dim, m.embed_dim) if m._qkv_same_embed_dim else (m.kdim, m.vdim)
