"""A checkpoint rebuilds any pruned model of every family in tasks/models/families.py: norms of any class
(ConvNextLayerNorm), layer scale, class/distillation tokens, position embeddings, relative-position-bias
tables and attention head counts all come back with the shapes pruning gave them. A family added to the
table is tested here without editing this file. Format-1 checkpoints still load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from tasks.errors import ModelLoadError
from tasks.models import create_model, load_checkpoint, save_checkpoint
from tasks.models.checkpoint import FORMAT, FORMAT_V1
from tasks.models.families import FAMILIES
from tasks.models.user import build_arch

# Torch-Pruning prunes tokens, layer scale and bias tables along their last dimension, as wanted here.
pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
SHAPE = [1, 28, 28]
X = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return build_arch(FAMILIES[family].arch, in_channels=1, num_classes=10).eval()


def _tp_prune(model: nn.Module) -> nn.Module | None:
    """Torch-Pruning's MetaPruner at 25 %, the classifier kept; None where it cannot prune this family."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10]
    try:
        pruner = tp.pruner.MetaPruner(model, torch.zeros(1, *SHAPE),
                                      importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.25, ignored_layers=heads)
        pruner.step()
        with torch.no_grad():
            model(X)
    except Exception:  # e.g. attention heads it does not respect (swin, mobilevit)
        return None
    return model


def _keep(layer: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    layer.weight = nn.Parameter(layer.weight.detach().index_select(dim, idx).clone())
    if dim == 0:
        layer.out_features = len(idx)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[idx].clone())
    else:
        layer.in_features = len(idx)


def _proj(m: nn.Module, *names: str) -> nn.Linear | None:
    found = [getattr(m, n) for n in names if isinstance(getattr(m, n, None), nn.Linear)]
    return found[0] if found else None


def _remove_heads_and_mlp_width(model: nn.Module) -> int:
    """What head-aware pruning does, by hand: drop the first head of every attention (query/key/value rows,
    output-projection columns, its column of a relative-position-bias table, the head count) and a quarter
    of every MLP's hidden width. Returns how many layers it changed."""
    modules = dict(model.named_modules())
    changed = 0
    for name, m in modules.items():
        heads = getattr(m, "num_attention_heads", None)
        size = getattr(m, "head_dim", getattr(m, "attention_head_size", None))
        qkv = [_proj(m, "q_proj", "query"), _proj(m, "k_proj", "key"), _proj(m, "v_proj", "value")]
        if not isinstance(heads, int) or heads < 2 or not isinstance(size, int) or None in qkv:
            continue
        parent = modules[name.rpartition(".")[0]]
        out = _proj(m, "o_proj") or _proj(getattr(parent, "output", nn.Module()), "dense")
        keep = torch.arange(size, heads * size)
        for layer in qkv:
            _keep(layer, keep, 0)
        _keep(out, keep, 1)
        for sub in m.modules():
            table = getattr(sub, "relative_position_bias_table", None)
            if isinstance(table, nn.Parameter) and table.shape[-1] == heads:
                sub.relative_position_bias_table = nn.Parameter(table.detach()[..., 1:].clone())
        m.num_attention_heads = heads - 1
        if hasattr(m, "all_head_size"):
            m.all_head_size = (heads - 1) * size
        changed += 1
    for m in modules.values():
        pair = ((_proj(m, "fc1"), _proj(m, "fc2")) if _proj(m, "fc1") and _proj(m, "fc2") else
                (_proj(getattr(m, "intermediate", nn.Module()), "dense"), _proj(getattr(m, "output", nn.Module()), "dense")))
        if None in pair or pair[0].out_features != pair[1].in_features:
            continue
        keep = torch.arange(pair[0].out_features // 4, pair[0].out_features)
        _keep(pair[0], keep, 0)
        _keep(pair[1], keep, 1)
        changed += 1
    return changed


def _roundtrip(model: nn.Module, family: str, tmp_path) -> tuple[nn.Module, dict]:
    save_checkpoint(model, tmp_path / "m.pt", arch=FAMILIES[family].arch, input_shape=SHAPE, num_classes=10)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["format"] == FORMAT
    return load_checkpoint(tmp_path / "m.pt")


def _assert_same(back: nn.Module, model: nn.Module) -> None:
    with torch.no_grad():
        expected, got = model(X), back(X)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_family_checkpoint_roundtrip(family, tmp_path):
    base = _build(family)
    n_before = sum(p.numel() for p in base.parameters())
    pruned = _tp_prune(copy.deepcopy(base))
    if pruned is None:
        pruned = copy.deepcopy(base)
        assert _remove_heads_and_mlp_width(pruned) > 0, f"{family}: neither Torch-Pruning nor the manual shrink applies"
    pruned.eval()
    assert sum(p.numel() for p in pruned.parameters()) < n_before
    back, info = _roundtrip(pruned, family, tmp_path)
    _assert_same(back, pruned)
    assert "state_dict" not in info and "extra_buffers" not in info


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heads_removed_checkpoint_roundtrip(family, tmp_path):
    model = _build(family)
    if not any(isinstance(getattr(m, "num_attention_heads", None), int) for m in model.modules()):
        pytest.skip(f"{family} has no attention heads")
    assert _remove_heads_and_mlp_width(model) > 0
    back, _ = _roundtrip(model, family, tmp_path)
    _assert_same(back, model)
    heads = {n: m.num_attention_heads for n, m in model.named_modules() if hasattr(m, "num_attention_heads")}
    assert {n: m.num_attention_heads for n, m in back.named_modules() if hasattr(m, "num_attention_heads")} == heads


class _Tokens(nn.Module):
    """Custom classes with no special case anywhere: a norm, a token, a layer scale, a non-persistent buffer."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.dim = dim
        self.token = nn.Parameter(torch.randn(1, 1, dim))
        self.scale = nn.Parameter(torch.ones(dim) * 0.5)
        self.proj = nn.Linear(4, dim)
        self.norm = nn.GroupNorm(2, dim)
        self.frozen = nn.Parameter(torch.randn(dim), requires_grad=False)
        self.register_buffer("mask", torch.ones(dim), persistent=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.proj(x.flatten(2)[..., :4])  # [N, 28*28/.., dim]
        h = torch.cat([self.token.expand(len(h), -1, -1), h], 1).mean(1) * self.scale * self.mask + self.frozen
        return self.head(self.norm(h))


def test_custom_parameters_buffers_and_attributes(tmp_path, monkeypatch):
    from tasks.models import registry

    monkeypatch.setitem(registry.MODELS, "tokens_test", lambda in_channels, num_classes: _Tokens())
    m = _Tokens().eval()
    keep = torch.arange(2, 8)  # 6 of 8 channels, by hand
    m.dim = 6
    m.token = nn.Parameter(m.token.detach()[..., keep])
    m.scale = nn.Parameter(m.scale.detach()[keep])
    m.frozen = nn.Parameter(m.frozen.detach()[keep], requires_grad=False)
    m.mask = torch.arange(6.0)  # non-persistent: travels beside the state_dict
    _keep(m.proj, keep, 0)
    _keep(m.head, keep, 1)
    m.norm = nn.GroupNorm(3, 6)
    m.norm.weight.data.uniform_()
    save_checkpoint(m, tmp_path / "m.pt", arch={"name": "tokens_test", "kwargs": {}}, input_shape=SHAPE, num_classes=10)
    back, _ = load_checkpoint(tmp_path / "m.pt")
    _assert_same(back, m)
    assert back.dim == 6 and back.norm.num_groups == 3 and back.norm.num_channels == 6
    assert not back.frozen.requires_grad and isinstance(back.frozen, nn.Parameter)
    assert torch.equal(back.mask, torch.arange(6.0)) and "mask" not in back.state_dict()


def test_format_1_checkpoint_still_loads(tmp_path):
    """A checkpoint as format 1 wrote it: Conv2d/Linear/BatchNorm channel counts only."""
    from compression_ops import ChannelPrune, OpData, apply

    m = create_model("resnet8", in_channels=1, num_classes=10).eval()
    p = apply(m, ChannelPrune(ratio=0.3), OpData(example=X[:1])).model.eval()
    v1: dict = {}
    for name, mod in p.named_modules():
        if isinstance(mod, nn.Conv2d):
            v1[name] = {"in": mod.in_channels, "out": mod.out_channels, "groups": mod.groups}
        elif isinstance(mod, nn.Linear):
            v1[name] = {"in": mod.in_features, "out": mod.out_features}
        elif isinstance(mod, nn.BatchNorm2d):
            v1[name] = {"num_features": mod.num_features}
    torch.save({"format": FORMAT_V1, "arch": {"name": "resnet8", "kwargs": {}}, "input_shape": SHAPE, "num_classes": 10,
                "structure": v1, "state_dict": p.state_dict(), "meta": {}}, tmp_path / "v1.pt")
    back, info = load_checkpoint(tmp_path / "v1.pt")
    assert info["format"] == FORMAT_V1
    _assert_same(back, p)


def test_checkpoint_of_another_architecture_names_the_layer(tmp_path):
    m = _build("convnext")
    save_checkpoint(m, tmp_path / "m.pt", arch=FAMILIES["regnet"].arch, input_shape=SHAPE, num_classes=10)
    with pytest.raises(ModelLoadError, match=r"checkpoint layer '.*' does not exist in the rebuilt model"):
        load_checkpoint(tmp_path / "m.pt")
