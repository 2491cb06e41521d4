import torch

from compression_ops import OpData, evaluate
from compression_ops.sensitivity import prunable_convs, prune_sensitivity, scan, weight_bits_sensitivity
from tasks.models import create_model

X = torch.randn(1, 1, 28, 28)


def _model():
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, width=8)
    m.train()
    with torch.no_grad():
        for _ in range(3):  # give BatchNorm real statistics
            m(torch.randn(32, 1, 28, 28))
    return m.eval()


def _agreement_with(ref):
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        y = ref(x).argmax(1)
    return lambda m: evaluate(m, [(x, y)])["accuracy"]  # agreement with the unperturbed model, in %


def test_prunable_convs_excludes_classifier_and_depthwise():
    names = prunable_convs(create_model("mobilenet_tiny", in_channels=1, num_classes=10), X)
    assert "stem.0" in names and "blocks.0.pw.0" in names
    assert not any(n.endswith("dw.0") for n in names)


def test_prune_scan_rows_and_monotone_damage():
    m = _model()
    acc = _agreement_with(m)
    out = prune_sensitivity(m, OpData(example=X), acc, ratios=(0.25, 0.75))
    assert out["base_accuracy"] == 100.0
    layers = prunable_convs(m, X)
    assert len(out["rows"]) == 2 * len(layers)
    mean_drop = {r: sum(x["drop"] for x in out["rows"] if x["setting"] == r) / len(layers) for r in (0.25, 0.75)}
    assert mean_drop[0.75] > mean_drop[0.25] >= 0  # pruning more of a layer hurts more, on average
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in _model().parameters())  # untouched


def test_weight_bits_scan_two_bits_hurts_more_than_eight():
    m = _model()
    out = weight_bits_sensitivity(m, _agreement_with(m), bits=(8, 2))
    d8 = [r["drop"] for r in out["rows"] if r["setting"] == 8]
    d2 = [r["drop"] for r in out["rows"] if r["setting"] == 2]
    assert max(d8) <= 5.0 and sum(d2) > sum(d8)


def test_scan_is_generic():
    m = torch.nn.Linear(2, 2)
    out = scan(m, ["a", "b"], [1, 2], lambda mm, layer, s: mm, lambda mm: 50.0)
    assert [(r["layer"], r["setting"], r["drop"]) for r in out["rows"]] == [("a", 1, 0.0), ("a", 2, 0.0), ("b", 1, 0.0), ("b", 2, 0.0)]


def test_prune_roots_scan_one_layer_per_group():
    from compression_ops.channel_prune import prune_groups
    from compression_ops.sensitivity import prune_roots

    m = _model()
    roots = prune_roots(m, X)
    groups = prune_groups(m, X)
    assert roots == [g[0] for g in groups]
    # a residual network ties several convs into one group: the roots are fewer than the prunable convs
    assert 0 < len(roots) < len(prunable_convs(m, X))
    out = prune_sensitivity(m, OpData(example=X), _agreement_with(m), ratios=(0.5,), layers=roots)
    assert [r["layer"] for r in out["rows"]] == roots
