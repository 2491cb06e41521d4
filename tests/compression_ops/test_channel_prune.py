import pytest
import torch

from compression_ops import ChannelPrune, OpConfigError, OpData, apply, config_from_dict
from compression_ops.channel_prune import IMPORTANCES, importance_for
from compression_ops.metrics import count_macs, count_params
from tasks.models import create_model

X = torch.randn(1, 1, 28, 28)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
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


def test_importance_table_builds_each_criterion():
    import torch_pruning as tp

    from compression_ops.dcp import DCPImportance

    expected = {
        "l1": tp.importance.GroupMagnitudeImportance,
        "l2": tp.importance.GroupMagnitudeImportance,
        "bn_scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "dcp": DCPImportance,
    }
    assert {name: type(importance_for(name)) for name in IMPORTANCES} == expected
    assert (importance_for("l1").p, importance_for("l2").p) == (1, 2)
    assert importance_for("dcp") is not importance_for("dcp")  # a fresh one per pruning: dcp keeps state


def test_unknown_importance_is_refused_when_the_config_is_made():
    known = r"expected one of bn_scale, dcp, l1, l2, taylor"
    with pytest.raises(OpConfigError, match=rf"importance='bogus': {known}"):
        ChannelPrune(importance="bogus")
    with pytest.raises(OpConfigError, match=rf"importance=\['l2'\]: {known}"):
        config_from_dict({"op": "channel_prune", "importance": ["l2"]})
    with pytest.raises(OpConfigError, match=known):
        importance_for("bogus")


def test_a_criterion_added_to_the_table_is_accepted_and_used(monkeypatch):
    import torch_pruning as tp

    made = []

    def random_importance():
        made.append("random")
        return tp.importance.RandomImportance()

    monkeypatch.setitem(IMPORTANCES, "random", random_importance)
    m = create_model("resnet8", in_channels=1, num_classes=10, width=4)
    res = apply(m, ChannelPrune(ratio=0.5, importance="random"), OpData(example=torch.randn(1, 1, 8, 8)))
    assert made == ["random"]
    assert res.report["importance"] == "random" and res.report["macs_after"] < res.report["macs_before"]


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


def _labelled(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_dcp_prunes_keeps_shapes_and_reports_heads():
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10)
    data = OpData(example=X, batches=_labelled())
    res = apply(m, ChannelPrune(ratio=0.5, importance="dcp"), data)
    p = res.model.eval()
    assert p(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert res.report["macs_after"] < 0.4 * res.report["macs_before"]
    # one head at the end of each stage but the last (the model's own classifier covers that one)
    assert res.report["dcp_aux_heads"] == ["layers.0", "layers.1"]
    assert all(q.grad is None for q in p.parameters())
    l2 = apply(m, ChannelPrune(ratio=0.5, importance="l2"), data).model
    differs = [
        n for (n, a), (_, b) in zip(p.named_modules(), l2.named_modules(), strict=True)
        if isinstance(a, torch.nn.Conv2d) and not torch.equal(a.weight, b.weight)
    ]
    assert differs  # a different criterion keeps different channels somewhere


def test_dcp_removes_dead_channels_first():
    # A channel whose BN output is always zero carries no gradient to its consumers: DCP scores it 0.
    torch.manual_seed(0)
    m = create_model("mobilenet_tiny", in_channels=1, num_classes=10).eval()
    pw = m.blocks[2].pw
    dead = [1, 5, 9, 13, 17, 21, 25, 29]
    with torch.no_grad():
        pw[1].weight[dead] = 0.0
        pw[1].bias[dead] = 0.0
        pw[0].weight[dead] *= 100  # big weights: magnitude criteria would keep them
    p = apply(m, ChannelPrune(ratio=0.0, per_layer={"blocks.2.pw.0": 0.125}, importance="dcp"),
              OpData(example=X, batches=_labelled())).model
    kept = p.blocks[2].pw[1].weight
    assert kept.shape == (56,) and bool((kept != 0).all())


def test_dcp_and_aux_points_on_mobilenet():
    from compression_ops.dcp import aux_points

    m = create_model("mobilenet_tiny", in_channels=1, num_classes=10)
    assert aux_points(m, X) == ["blocks.0", "blocks.2"]
    flat = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    assert aux_points(flat, X) == ["1"]  # no downsampling: one head at the middle feature map


def test_dcp_needs_batches():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    with pytest.raises(OpConfigError, match=r"importance='dcp' needs labelled batches"):
        apply(m, ChannelPrune(ratio=0.2, importance="dcp"), OpData(example=X))


def test_latency_target_reports_measured_factor():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    res = apply(m, ChannelPrune(target_latency_reduction=1.3, latency_repeat=5), OpData(example=X))
    assert 0.0 < res.report["ratio"] < 1.0
    assert res.report["latency_reduction"] > 0.7  # timing on a shared, loaded machine: no tight bound
    assert res.report["latency_before_ms"] > 0 and res.report["latency_after_ms"] > 0
    assert res.report["macs_reduction"] > 1.0


def test_only_one_target():
    with pytest.raises(OpConfigError, match="both set: keep one"):
        ChannelPrune(target_macs_reduction=2.0, target_latency_reduction=2.0)
    with pytest.raises(OpConfigError, match=r"target_latency_reduction=0.5"):
        ChannelPrune(target_latency_reduction=0.5)
    c = ChannelPrune(target_latency_reduction=1.5, importance="dcp")
    assert config_from_dict(c.to_dict()) == c


def test_report_names_what_was_pruned_and_what_was_left():
    m = create_model("resnet8", in_channels=1, num_classes=10)
    rep = apply(m, ChannelPrune(ratio=0.3, ignore=["layers.2.conv1"]), OpData(example=X)).report
    assert rep["skipped"] == {"fc": "its outputs are the classes", "layers.2.conv1": "named in the config's ignore list"}
    assert "stem.0" in rep["applied"] and "layers.2.conv1" not in rep["applied"] and "fc" not in rep["applied"]
    assert "heads_before" not in rep  # no attention, no head counts


def test_a_model_the_output_check_fails_raises_op_broke_model(monkeypatch):
    from compression_ops import prune_plan
    from compression_ops.channel_prune import OpBrokeModel

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 8, -1).mean(-1)

    m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), Fixed(), torch.nn.Linear(8, 10))
    monkeypatch.setattr(prune_plan.GroupPruner, "dry_run", lambda self, example, shape: {})  # no dry run
    with pytest.raises(OpBrokeModel, match=r"channel_prune broke the model: forward raises RuntimeError.*pruned: 0"):
        apply(m, ChannelPrune(ratio=0.5), OpData(example=X))
