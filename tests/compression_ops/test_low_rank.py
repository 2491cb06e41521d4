import pytest
import torch
from torch import nn

from compression_ops import ChannelPrune, OpConfigError, OpData, apply, config_from_dict
from compression_ops.low_rank import LowRank, factorise_conv_tucker2, rank_for
from compression_ops.metrics import count_macs, count_params
from tasks.models import create_model

X = torch.randn(1, 1, 28, 28)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", in_channels=1, num_classes=10).eval()


def test_rank_ratio_shrinks_and_keeps_shapes():
    m = _resnet()
    res = apply(m, LowRank(rank_ratio=0.25), OpData(example=X))
    p = res.model.eval()
    assert p(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert count_params(p) < 0.3 * count_params(m)
    assert res.report["params_after"] == count_params(p)
    assert res.report["macs_after"] == count_macs(p, X) < res.report["macs_before"]
    conv2 = p.layers[1].conv2
    assert isinstance(conv2, nn.Sequential) and [c.kernel_size for c in conv2] == [(1, 1), (3, 3), (1, 1)]
    assert res.report["per_layer"]["layers.1.conv2"] == {
        "kind": "tucker2", "ranks": [8, 8], "params_before": 9216, "params_after": 32 * 8 * 2 + 8 * 8 * 9,
        "macs_before": 9216 * 196, "macs_after": (32 * 8 * 2 + 8 * 8 * 9) * 196,
    }
    assert res.report["per_layer"]["fc"]["kind"] == "svd" and res.report["per_layer"]["fc"]["ranks"] == [3]
    assert count_params(m) == res.report["params_before"]  # the input model is untouched


def test_full_rank_is_exact():
    m = _resnet()
    p = apply(m, LowRank(rank_ratio=1.0, min_params_saving=None), OpData(example=X)).model.eval()
    assert isinstance(p.layers[0].conv1, nn.Sequential) and isinstance(p.fc, nn.Sequential)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(p(x), m(x), atol=1e-4)


def test_high_energy_is_close_and_strided_dilated_convs_stay_exact():
    m = _resnet()
    p = apply(m, LowRank(energy=0.99, min_params_saving=None), OpData(example=X)).model.eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref, out = m(x), p(x)
    assert (out - ref).norm() / ref.norm() < 0.1
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2, bias=True)
    f = factorise_conv_tucker2(conv, 6, 5)
    x = torch.randn(2, 6, 11, 11)
    with torch.no_grad():
        assert torch.allclose(f(x), conv(x), atol=1e-5)


def test_rank_for():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for(s, energy=0.5) == 1
    assert rank_for(s, energy=0.9) == 2
    assert rank_for(s, energy=1.0) == 3
    assert rank_for(s, rank_ratio=0.25) == 1 and rank_for(s, rank_ratio=0.3) == 2


def test_min_saving_skip_and_layer_kinds():
    m = _resnet()
    res = apply(m, LowRank(rank_ratio=1.0), OpData(example=X))  # full rank only grows layers
    assert res.report["layers_factorised"] == 0 and "fc" in res.report["skipped"]
    res = apply(m, LowRank(rank_ratio=0.25, layers="linear"), OpData(example=X))
    assert list(res.report["per_layer"]) == ["fc"]
    res = apply(m, LowRank(rank_ratio=0.25, skip=["fc"], per_layer={"layers.2.conv2": 0.5}), OpData(example=X))
    assert "fc" not in res.report["per_layer"] and isinstance(res.model.fc, nn.Linear)
    assert res.report["per_layer"]["layers.2.conv2"]["ranks"] == [32, 32]


def test_depthwise_convs_are_left_alone():
    m = create_model("mobilenet_tiny", in_channels=1, num_classes=10).eval()
    res = apply(m, LowRank(rank_ratio=0.25), OpData(example=X))
    assert isinstance(res.model.blocks[0].dw[0], nn.Conv2d)
    assert isinstance(res.model.blocks[4].pw[0], nn.Sequential)
    assert not any(n.endswith("dw.0") for n in res.report["per_layer"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"energy": 1.5}, r"energy=1.5 is out of range"),
        ({"energy": 0.9, "rank_ratio": 0.5}, r"exactly one of energy .* and rank_ratio"),
        ({}, r"exactly one of energy"),
        ({"rank_ratio": 0.0}, r"rank_ratio=0.0 is out of range"),
        ({"energy": 0.9, "per_layer": {"fc": 2.0}}, r"per_layer\['fc'\] \(energy\)"),
        ({"energy": 0.9, "layers": "attention"}, r"layers='attention'"),
        ({"energy": 0.9, "min_params_saving": 1.0}, r"min_params_saving=1.0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(OpConfigError, match=match):
        LowRank(**kwargs)


def test_unknown_layer_and_json_roundtrip():
    with pytest.raises(OpConfigError, match="not in the model"):
        apply(_resnet(), LowRank(energy=0.9, skip=["nope"]), OpData(example=X))
    c = LowRank(energy=0.8, per_layer={"fc": 0.95}, skip=["stem.0"], layers="conv")
    assert config_from_dict(c.to_dict()) == c and c.phase == "structure"


def test_prune_then_low_rank():
    m = _resnet()
    pruned = apply(m, ChannelPrune(ratio=0.3), OpData(example=X)).model
    res = apply(pruned, LowRank(rank_ratio=0.5), OpData(example=X))
    assert res.report["layers_factorised"] > 0
    assert res.model.eval()(X).shape == (1, 10)
    assert count_params(res.model) < count_params(pruned)


def test_low_rank_then_prune_cuts_ranks_too():
    # Torch-Pruning sees the factors as ordinary layers: the rank channels are pruned with the rest.
    lr = apply(_resnet(), LowRank(rank_ratio=0.5), OpData(example=X)).model
    p = apply(lr, ChannelPrune(ratio=0.3), OpData(example=X)).model.eval()
    assert p(X).shape == (1, 10)
    assert p.layers[1].conv2[0].out_channels < lr.layers[1].conv2[0].out_channels
    assert p.fc[1].out_features == 10
