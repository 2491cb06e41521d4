import pytest
import torch

from compression_ops import ChannelPrune, OpConfigError, OpData, apply, config_from_dict
from compression_ops.metrics import count_macs, count_params
from tasks.models import create_model

X = torch.randn(1, 1, 28, 28)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor"])
def test_prune_removes_channels_and_keeps_shapes(name, importance):
    m = create_model(name, in_channels=1, num_classes=10)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    res = apply(m, ChannelPrune(ratio=0.5, importance=importance), OpData(example=X, batches=batches))
    p = res.model.eval()
    assert p(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert count_params(p) < 0.4 * count_params(m)  # ~ (1 - 0.5)^2 of the weights remain
    assert res.report["macs_after"] < 0.4 * res.report["macs_before"]
    assert count_params(m) == res.report["params_before"]  # the input model is untouched


def test_macs_target_is_met():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    res = apply(m, ChannelPrune(target_macs_reduction=2.0), OpData(example=X))
    assert res.report["macs_reduction"] >= 2.0
    assert res.report["macs_reduction"] < 2.6  # solved, not overshot wildly


def test_residual_groups_stay_consistent():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    p = apply(m, ChannelPrune(ratio=0.3), OpData(example=X)).model
    blk = p.layers[1]
    # the residual add forces the block output and its shortcut to the same width
    assert blk.conv2.out_channels == blk.shortcut[0].out_channels
    assert p.fc.in_features == p.layers[2].conv2.out_channels
    assert p.fc.out_features == 10  # the classifier's outputs are never pruned


def test_mild_pruning_keeps_outputs_close():
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        for mod in m.modules():  # near-dead channels: what magnitude pruning should remove first
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight[: mod.num_features // 8] = 1e-4
    p = apply(m, ChannelPrune(ratio=0.1, importance="bn_scale"), OpData(example=X)).model.eval()
    x = torch.randn(16, 1, 28, 28)
    agree = (m(x).argmax(1) == p(x).argmax(1)).float().mean()
    assert agree >= 0.8


def test_per_layer_ratio():
    m = create_model("mobilenet_tiny", in_channels=1, num_classes=10)
    p = apply(m, ChannelPrune(ratio=0.0, per_layer={"blocks.4.pw.0": 0.5}), OpData(example=X)).model
    assert p.blocks[4].pw[0].out_channels == 64
    assert p.blocks[2].pw[0].out_channels == 64  # untouched


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.5}, r"ratio=1.5 is out of range"),
        ({"ratio": -0.1}, r"ratio=-0.1 is out of range"),
        ({"importance": "random"}, r"importance='random'"),
        ({"target_macs_reduction": 1.0}, r"target_macs_reduction=1.0"),
        ({"per_layer": {"x": 2.0}}, r"per_layer\['x'\]"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(OpConfigError, match=match):
        ChannelPrune(**kwargs)


def test_unreachable_target_and_unknown_layer():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    with pytest.raises(OpConfigError, match="out of reach"):
        apply(m, ChannelPrune(target_macs_reduction=5000), OpData(example=X))
    with pytest.raises(OpConfigError, match=r"not in the model"):
        apply(m, ChannelPrune(ratio=0.2, per_layer={"nope": 0.5}), OpData(example=X))


def test_taylor_needs_batches():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    with pytest.raises(OpConfigError, match="needs labelled batches"):
        apply(m, ChannelPrune(ratio=0.2, importance="taylor"), OpData(example=X))


def test_config_json_roundtrip():
    c = ChannelPrune(ratio=0.25, importance="taylor", per_layer={"a": 0.1})
    assert config_from_dict(c.to_dict()) == c
    with pytest.raises(OpConfigError, match="unknown op 'zap'"):
        config_from_dict({"op": "zap"})
    with pytest.raises(OpConfigError, match="no field"):
        config_from_dict({"op": "channel_prune", "speed": 3})


def test_macs_counter_matches_hand_count():
    conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    assert count_macs(conv, torch.randn(1, 1, 5, 5)) == 4 * 9 * 25


def test_macs_target_with_hardware_friendly_widths():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    res = apply(m, ChannelPrune(target_macs_reduction=2.0, round_to=4), OpData(example=X))
    assert res.report["macs_reduction"] >= 2.0
    convs = [mod for mod in res.model.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert all(c.out_channels % 4 == 0 for c in convs)
