import pytest
import torch

from compression_ops import OpConfigError, TrainSpec, apply, config_from_dict, fit
from compression_ops.sparsity import Sparsify, nm_mask, zhu_gupta
from tasks.models import create_model


def _tiny(name: str = "resnet8", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"width": 8} if name == "resnet8" else {"width": 0.25}
    return create_model(name, in_channels=1, num_classes=10, **kwargs)


def _batches(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _layers(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach() for n in names}


def test_global_oneshot_hits_the_target_count():
    m = _tiny()
    res = apply(m, Sparsify(sparsity=0.6))
    ws = _layers(res.model, res.report["per_layer"])
    total = sum(w.numel() for w in ws.values())
    zeros = sum(int((w == 0).sum()) for w in ws.values())
    assert zeros == round(0.6 * total)
    assert res.report["sparsity"] == pytest.approx(0.6, abs=1e-4)
    # one threshold: every surviving weight is at least as large as every pruned one was
    before = _layers(m, ws)
    pruned = torch.cat([before[n][ws[n] == 0] for n in ws]).abs().max()
    kept = torch.cat([ws[n][ws[n] != 0] for n in ws]).abs().min()
    assert kept >= pruned
    assert all(int((w == 0).sum()) == 0 for w in _layers(m, ws).values())  # the input model is untouched


def test_layer_scope_prunes_each_layer_to_the_target():
    res = apply(_tiny(), Sparsify(sparsity=0.3, scope="layer"))
    for name, w in _layers(res.model, res.report["per_layer"]).items():
        assert int((w == 0).sum()) == round(0.3 * w.numel()), name


def test_2of4_pattern_group_by_group():
    res = apply(_tiny(), Sparsify(pattern="2:4"))
    assert "stem.0" in res.report["skipped"]  # one input channel: no groups of 4
    assert res.report["sparsity"] == 0.5 and res.report["target_sparsity"] == 0.5
    for name, w in _layers(res.model, res.report["per_layer"]).items():
        groups = w.movedim(1, -1).reshape(-1, 4)  # along input channels at each kernel position
        assert ((groups != 0).sum(1) == 2).all(), name


def test_nm_mask_keeps_the_largest_in_each_group():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 0.0, -1.0, 0.4]])
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False, True, False, True, False]]
    assert nm_mask(w, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]


def test_layer_selection_flags():
    m = _tiny("mobilenet_tiny")
    res = apply(m, Sparsify(sparsity=0.5, skip=["blocks.0"], skip_classifier=True))
    names = set(res.report["per_layer"])
    assert "fc" not in names and not any(n.startswith("blocks.0.") for n in names)
    assert not any(".dw." in n for n in names)  # depthwise convs are skipped by default
    assert res.model.fc.weight.ne(0).all() and res.model.blocks[1].dw[0].weight.ne(0).all()
    res = apply(m, Sparsify(sparsity=0.5, skip_depthwise=False))
    assert "blocks.1.dw.0" in res.report["per_layer"] and "fc" in res.report["per_layer"]


def test_gradual_schedule_rises_monotonically_and_reaches_target():
    cfg = Sparsify(sparsity=0.8, schedule="gradual", initial_sparsity=0.1, begin_fraction=0.1,
                   end_fraction=0.5, update_every=3)
    res = apply(_tiny(), cfg)
    assert res.report["sparsity"] == pytest.approx(0.1, abs=1e-3)
    hook = res.hooks[0]
    total, seen = 40, []
    for step in range(total):
        hook.before_step(step, total)
        with torch.no_grad():  # stands in for an optimizer step that would regrow pruned weights
            for name in res.report["per_layer"]:
                dict(res.model.named_modules())[name].weight.add_(0.01)
        hook.after_step(step, total)
        seen.append(hook.finish()["sparsity"])
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:], strict=False))
    assert seen[15] < 0.79 and seen[19] < seen[20]  # t1 = 0.5 * 40 = step 20
    assert seen[20] == pytest.approx(0.8, abs=1e-4) and seen[-1] == pytest.approx(0.8, abs=1e-4)
    updates = [s for s, _ in hook.history]
    # t0 = 4, where the schedule starts at initial_sparsity (already applied); then every 3rd step to t1
    assert updates[0] == 7 and all(s % 3 == 1 for s in updates[:-1]) and updates[-1] == 20
    for s, sp in hook.history:
        assert sp == pytest.approx(zhu_gupta(s, 4, 20, 0.1, 0.8))
    assert hook.finish()["target_reached"]


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_pruned_weights_stay_zero_through_fit(schedule):
    m = _tiny()
    res = apply(m, Sparsify(sparsity=0.5, schedule=schedule, end_fraction=0.5, update_every=1))
    before = {n: w.clone() for n, w in _layers(res.model, res.report["per_layer"]).items()}
    fit(res.model, _batches(4), TrainSpec(epochs=1, lr=0.05), hooks=res.hooks)
    after = _layers(res.model, before)
    hook = res.hooks[0]
    for name, w in after.items():
        assert torch.equal(w == 0, ~hook.masks[name]), name  # zero exactly where the mask prunes
    assert any(not torch.equal(before[n], after[n]) for n in after)  # the kept weights did train
    got = hook.finish()
    assert got["sparsity"] == pytest.approx(0.5, abs=1e-4) and got["target_reached"]
    assert got["packed_bytes"] < res.report["packed_bytes_before"]


def test_mild_sparsity_keeps_outputs_close():
    m = _tiny().eval()
    p = apply(m, Sparsify(sparsity=0.1)).model.eval()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        y, yp = m(x), p(x)
    assert float((y - yp).norm() / y.norm()) < 0.05
    assert (y.argmax(1) == yp.argmax(1)).float().mean() >= 0.9


def test_sparse_model_is_plain_and_exports():
    m = _tiny()
    res = apply(m, Sparsify(sparsity=0.5))
    p = res.model.eval()
    assert p.state_dict().keys() == m.state_dict().keys()  # no masks or parametrisations left behind
    assert not any(hasattr(mod, "parametrizations") for mod in p.modules())
    x = torch.randn(2, 1, 28, 28)
    ep = torch.export.export(p, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), p(x), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.5}, r"sparsity=1.5 is out of range"),
        ({"sparsity": 1.0}, r"sparsity=1.0 is out of range"),
        ({"pattern": "4:2"}, r"pattern='4:2'"),
        ({"pattern": "2-4"}, r"pattern='2-4'"),
        ({"pattern": "2:4", "sparsity": 0.7}, r"set sparsity=0.5 or leave it unset"),
        ({"pattern": "2:4", "schedule": "gradual"}, r"set schedule='oneshot'"),
        ({"scope": "net"}, r"scope='net'"),
        ({"schedule": "cubic"}, r"schedule='cubic'"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, r"initial_sparsity=0.6"),
        ({"begin_fraction": 0.5, "end_fraction": 0.4}, r"end_fraction=0.4"),
        ({"update_every": 0}, r"update_every=0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(OpConfigError, match=match):
        Sparsify(**kwargs)


def test_unknown_layer_name_and_json_roundtrip():
    with pytest.raises(OpConfigError, match=r"\['nope'\] not in the model"):
        apply(_tiny(), Sparsify(sparsity=0.5, skip=["nope"]))
    c = Sparsify(sparsity=0.7, schedule="gradual", skip=["fc"])
    assert config_from_dict(c.to_dict()) == c
    assert Sparsify.phase == "train" and Sparsify(pattern="1:4").target == 0.75
