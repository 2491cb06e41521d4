"""Every op on every model family (tasks/models/families.py, so a new family is tested without editing
this file): no exception escapes, the output keeps its shape and stays finite, the report names the
layers changed and the ones left alone; the coverage table of a plan over each family; transformers
readiness of quantize_int8 (3-D Linear inputs, LayerNorm in float, BN folding past an untraceable
model) and low_rank on a ViT's MLP."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from compression_ops import KMeansQuant, LowRank, OpData, QuantizeInt8, Sparsify, apply
from compression_ops.base import check_outputs, param_layers
from compression_ops.coverage import APPLIED, NOT_CANDIDATE, coverage, skipped_by_reason
from tasks.models.families import FAMILIES
from tasks.models.user import build_arch

NUM_CLASSES = 10
OPS = {
    "quantize_int8": QuantizeInt8(calib_batches=2),
    "low_rank": LowRank(energy=0.9, layers="linear"),
    "sparsify": Sparsify(sparsity=0.5),
    "kmeans": KMeansQuant(bits=4, iters=3),
}


@functools.cache
def family_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_arch(FAMILIES[name].arch, in_channels=1, num_classes=NUM_CLASSES).eval()


@functools.cache
def data() -> OpData:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 1, 28, 28, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g))
               for _ in range(2)]
    return OpData(example=torch.rand(1, 1, 28, 28, generator=g), batches=batches, max_batches=2)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_op_runs_on_every_family_and_reports_its_layers(family, op):
    model, d = family_model(family), data()
    res = apply(model, OPS[op], d)
    assert check_outputs(model, res.model, d.example) is None
    with torch.no_grad():
        out = res.model.eval()(d.example)
    assert out.shape == (1, NUM_CLASSES) and torch.isfinite(out).all()
    applied, skipped = res.report["applied"], res.report["skipped"]
    assert isinstance(applied, list) and isinstance(skipped, dict) and json.dumps(res.report)
    layers = dict(model.named_modules())
    assert set(applied) <= set(layers) and set(skipped) <= set(layers), "reports name layers of the input model"
    assert not set(applied) & set(skipped)
    assert all(isinstance(why, str) and why for why in skipped.values())
    if op != "low_rank":  # low_rank may rightly skip every layer of a random tiny model (no saving)
        assert applied, f"{op} changed no layer of {family}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_coverage_of_a_plan_lists_every_layer_and_a_fraction(family):
    model, d = family_model(family), data()
    reports = [apply(model, OPS[op], d).report for op in ("low_rank", "quantize_int8")]
    cov = coverage(model, d.example, reports)
    assert json.loads(json.dumps(cov)) == cov
    assert set(cov["layers"]) == set(param_layers(model)) - {""} and cov["ops"] == ["low_rank", "quantize_int8"]
    assert 0 < cov["macs_covered_fraction"] <= 1
    assert cov["macs_total"] == cov["layer_macs"] + cov["functional_macs"] >= cov["macs_covered"]
    for name, row in cov["layers"].items():
        q = row["ops"]["quantize_int8"]
        assert q == APPLIED or q.startswith("skipped: ") or q == NOT_CANDIDATE
        if isinstance(model.get_submodule(name), nn.Conv2d | nn.Linear):
            assert q == APPLIED, f"{name}: {q}"
        if isinstance(model.get_submodule(name), nn.LayerNorm):
            assert q.startswith("skipped: kept in float: ") and "LayerNorm" in q, f"{name}: {q}"
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        assert any("LayerNorm" in why for why in skipped_by_reason(cov)["quantize_int8"])


def test_attention_matmuls_count_apart_and_are_never_covered():
    model, d = family_model("vit"), data()
    cov = coverage(model, d.example, [apply(model, OPS["sparsify"], d).report])
    # 2 blocks x (Q.K^T + weights.V): 2 x 2 x 50 tokens x 50 tokens x 32 dims
    assert cov["functional_macs"] == 2 * 2 * 50 * 50 * 32
    assert cov["macs_covered"] <= cov["layer_macs"] < cov["macs_total"]


def test_coverage_maps_parts_of_a_factorised_layer_and_reverted_ops():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.LayerNorm(32), nn.Linear(32, 10))
    x = torch.rand(1, 1, 28, 28)
    reports = [
        {"op": "low_rank", "applied": ["1"], "skipped": {"3": "below min_params_saving (ranks [9] save 3%)"}},
        {"op": "quantize_int8", "applied": ["1.0", "1.1", "3"], "skipped": {"2": "kept in float: LayerNorm"}},
        {"op": "channel_prune", "applied": [], "skipped": {}, "reverted": "it raised RuntimeError: boom"},
        {"op": "sparsify", "sparsity": 0.5},  # an op whose report lists no layers
    ]
    cov = coverage(model, x, reports)
    assert cov["ops"] == ["low_rank", "quantize_int8", "channel_prune", "sparsify"]
    assert cov["layers"]["1"]["ops"].pop("sparsify") == "not reported: the op's report lists no layers"
    assert cov["layers"]["1"]["ops"] == {"low_rank": APPLIED, "quantize_int8": APPLIED,
                                         "channel_prune": "reverted: it raised RuntimeError: boom"}
    assert cov["layers"]["3"]["ops"]["low_rank"] == "skipped: below min_params_saving (ranks [9] save 3%)"
    assert cov["reverted"] == {"channel_prune": "it raised RuntimeError: boom"}
    assert skipped_by_reason(cov)["low_rank"] == {"below min_params_saving": ["3"]}
    # MACs as count_macs counts them: a Linear's with its bias adds, a LayerNorm's 2 per element;
    # every layer but the LayerNorm (which no op changed) is covered
    assert cov["layers"]["1"]["macs"] == 784 * 32 + 32 and cov["layers"]["2"]["macs"] == 2 * 32
    assert cov["macs_covered"] == cov["macs_total"] - 2 * 32 and cov["functional_macs"] == 0


def _mlp_linears(model: nn.Module) -> list[str]:
    """A ViT block's MLP layers (intermediate/output dense, or mlp.fc1/fc2 as newer transformers name them)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layer" in n and "attention" not in n]


def _low_rank_mlp(model: nn.Module) -> None:
    """Make every ViT MLP weight nearly rank 4, as trained MLPs are nearly low-rank (a random one is not)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in _mlp_linears(model):
            m = model.get_submodule(name)
            o, i = m.weight.shape
            m.weight.copy_(torch.randn(o, 4, generator=g) @ torch.randn(4, i, generator=g) / 4
                           + 1e-3 * torch.randn(o, i, generator=g))


def test_low_rank_factorises_a_vit_mlp_and_the_output_stays_close():
    torch.manual_seed(0)
    model = build_arch(FAMILIES["vit"].arch, in_channels=1, num_classes=NUM_CLASSES).eval()
    _low_rank_mlp(model)
    d = data()
    res = apply(model, LowRank(energy=0.99, layers="linear"), d)
    mlp = _mlp_linears(model)
    assert len(mlp) == 4 and set(mlp) <= set(res.report["applied"]), res.report["skipped"]
    assert all(r["ranks"][0] <= 5 for r in res.report["per_layer"].values())
    assert res.report["skipped"]["model.vit.embeddings.patch_embeddings.projection"] == "not selected: layers='linear'"
    with torch.no_grad():
        ref, out = model(d.example), res.model(d.example)
    assert torch.allclose(out, ref, atol=1e-2 * float(ref.abs().max()))  # energy 0.99 drops 1% of it


def test_quantize_int8_on_vit_quantizes_3d_linear_inputs_and_keeps_layernorm_float():
    model, d = family_model("vit"), data()
    res = apply(model, QuantizeInt8(calib_batches=2), d)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(linears) <= set(res.report["applied"])
    for n, m in res.model.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert type(m) is nn.LayerNorm and res.report["skipped"][n].startswith("kept in float: LayerNorm")
    with torch.no_grad():
        ref, out = model(d.example), res.model(d.example)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_batchnorm_folds_inside_a_model_torch_fx_cannot_trace():
    model, d = family_model("resnet_basic"), data()
    with pytest.raises(Exception):  # noqa: B017  (transformers models do not trace whole)
        torch.fx.symbolic_trace(model)
    res = apply(model, QuantizeInt8(calib_batches=2), d)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert res.report["bn_folded"] == len(bns) and set(bns) <= set(res.report["applied"])
    with torch.no_grad():
        ref, out = model(d.example), res.model(d.example)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_a_layer_the_forward_never_runs_stays_float_instead_of_crashing():
    class WithUnusedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, NUM_CLASSES))
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.body(x)

    res = apply(WithUnusedHead(), QuantizeInt8(calib_batches=2), data())
    assert res.report["applied"] == ["body.1"]
    assert res.report["skipped"] == {"unused": "kept in float: not run by the calibration batches"}
    assert type(res.model.unused) is nn.Linear


def test_check_outputs_names_what_broke():
    x = torch.rand(2, 1, 28, 28)
    good = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    assert check_outputs(good, good, x) is None
    assert "shape (2, 7) instead of (2, 10)" in check_outputs(good, nn.Sequential(nn.Flatten(), nn.Linear(784, 7)), x)
    nan = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        nan[1].bias.fill_(float("nan"))
    assert "NaN" in check_outputs(good, nan, x)
    assert "raises RuntimeError" in check_outputs(good, nn.Sequential(nn.Linear(3, 3)), x)
