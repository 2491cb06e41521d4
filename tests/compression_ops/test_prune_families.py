"""Channel pruning on every model family of tasks.models.families: a family added there is tested here."""

import functools

import pytest
import torch
from torch import nn

from compression_ops import ChannelPrune, OpConfigError, OpData, apply
from compression_ops.attention import find_attention
from compression_ops.channel_prune import prune_groups
from tasks.models.families import FAMILIES
from tasks.models.user import build_arch

X = torch.randn(1, 1, 28, 28)
CLASSES = "its outputs are the classes"


@functools.cache
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_arch(FAMILIES[name].arch, in_channels=1, num_classes=10).eval()


def _family(name: str) -> nn.Module:
    import copy

    return copy.deepcopy(_built(name))


@functools.cache
def _pruned(name: str):
    return apply(_family(name), ChannelPrune(ratio=0.3), OpData(example=X))


def _heads_consistent(model: nn.Module) -> None:
    """The head counts forward() reads agree with the projections (what a checkpoint records)."""
    for m in model.modules():
        if isinstance(getattr(m, "query", None), nn.Linear) and hasattr(m, "attention_head_size"):
            assert m.num_attention_heads * m.attention_head_size == m.query.out_features == m.all_head_size
        if isinstance(getattr(m, "q_proj", None), nn.Linear) and hasattr(m, "num_attention_heads"):
            assert m.num_attention_heads * m.head_dim == m.q_proj.out_features == m.k_proj.out_features
            table = getattr(getattr(m, "relative_position_bias", None), "relative_position_bias_table", None)
            if table is not None:
                assert table.shape[-1] == m.num_attention_heads


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_prunes_and_still_works(name):
    res = _pruned(name)
    out = res.model.eval()(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    rep = res.report
    assert rep["macs_reduction"] > 1.1
    assert rep["applied"] and all(isinstance(n, str) for n in rep["applied"])
    assert CLASSES in rep["skipped"].values()  # the classifier, by name
    names = dict(_built(name).named_modules())
    assert set(rep["applied"]) <= set(names) and set(rep["skipped"]) <= set(names)  # names in the model given
    assert not set(rep["applied"]) & set(rep["skipped"])
    _heads_consistent(res.model)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if "attention" in f.features])
def test_attention_loses_whole_heads(name):
    rep = _pruned(name).report
    assert rep["heads_after"] < rep["heads_before"]
    before = {a.name: a for a in find_attention(_built(name))}
    for a in find_attention(_pruned(name).model):
        assert 1 <= a.heads <= before[a.name].heads
        assert a.head_dim == before[a.name].head_dim  # heads go whole; their width stays


def test_swin_heads_and_bias_table_follow():
    rep = _pruned("swin").report
    assert rep["heads_after"] < rep["heads_before"]
    # stage 0's residual width feeds the patch merging, which Torch-Pruning cannot follow: left whole, reported
    assert any("normalized_shape" in why for why in rep["skipped"].values())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_macs_target_on_every_family(name):
    try:
        res = apply(_family(name), ChannelPrune(target_macs_reduction=1.5), OpData(example=X))
    except OpConfigError as e:
        assert "out of reach" in str(e)
        return
    assert res.report["macs_reduction"] >= 1.5
    assert res.model(X).shape == (1, 10)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prune_groups_on_every_family(name):
    groups = prune_groups(_family(name), X)
    assert groups and all(g and isinstance(g[0], str) for g in groups)


class _HardCodedReshape(nn.Module):
    """Reshapes by a channel count fixed when built: pruning its input cannot work."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.channels, -1).mean(-1)


def test_a_layer_pruning_cannot_handle_is_skipped_and_reported():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),  # "0": free to prune
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),  # "2": feeds the hard-coded reshape
        _HardCodedReshape(16), nn.Linear(16, 10),
    )
    res = apply(model, ChannelPrune(ratio=0.5), OpData(example=X))
    assert res.model(X).shape == (1, 10)
    assert "2" in res.report["skipped"] and "RuntimeError" in res.report["skipped"]["2"]
    assert res.report["skipped"]["5"] == CLASSES
    assert res.report["applied"] == ["0"]
    assert res.model[2].out_channels == 16 and res.model[0].out_channels == 4


class _FusedQKV(nn.Module):
    """timm-style attention: one qkv projection, num_heads and head_dim."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class _TinyTransformer(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.embed = nn.Conv2d(1, 32, 7, stride=7)
        self.attn = attention
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        if isinstance(self.attn, nn.MultiheadAttention):
            t = t + self.attn(t, t, t, need_weights=False)[0]
        else:
            t = t + self.attn(t)
        return self.head(t.mean(1))


def test_fused_qkv_attention_loses_whole_heads():
    torch.manual_seed(0)
    res = apply(_TinyTransformer(_FusedQKV(32, 4)), ChannelPrune(ratio=0.5), OpData(example=X))
    attn = res.model.attn
    assert (res.report["heads_before"], res.report["heads_after"]) == (4, 2)
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * attn.head_dim and attn.head_dim == 8
    assert res.model(X).shape == (1, 10)


def test_torch_multihead_attention_is_narrowed_evenly_per_head():
    torch.manual_seed(0)
    res = apply(_TinyTransformer(nn.MultiheadAttention(32, 4, batch_first=True)), ChannelPrune(ratio=0.3),
                OpData(example=X))
    mha = res.model.attn
    assert res.model(X).shape == (1, 10)
    assert mha.embed_dim < 32 and mha.embed_dim % 4 == 0 and mha.head_dim * 4 == mha.embed_dim
    assert "attn" in res.report["applied"] and res.report["skipped"]["head"] == CLASSES
