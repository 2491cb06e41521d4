import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression_ops.base import OpConfigError, OpData, apply, config_from_dict, to_plain
from compression_ops.finetune import TrainSpec, fit
from compression_ops.metrics import weight_bits
from compression_ops.quant_ranges import RangeObserver, choose_range, quantize_weight_per_channel
from compression_ops.quantize import QuantAware, QuantConv2d, QuantizeInt8, QuantLinear, fold_batchnorm
from tasks.models import create_model


def _model(name: str = "resnet8", seed: int = 0) -> nn.Module:
    """A zoo model whose BN statistics come from a few train-mode passes (not the identity init)."""
    torch.manual_seed(seed)
    kwargs = {"width": 8} if name == "resnet8" else {"width": 0.5}
    m = create_model(name, in_channels=1, num_classes=10, **kwargs).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(32, 1, 28, 28) * 1.5 + 0.3)
    return m.eval()


def _data(n: int = 3, bs: int = 32) -> OpData:
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(bs, 1, 28, 28, generator=gen), torch.randint(0, 10, (bs,), generator=gen)) for _ in range(n)]
    return OpData(example=batches[0][0][:1], batches=batches)


def _distinct_per_channel(w: torch.Tensor) -> int:
    return max(int(torch.unique(row).numel()) for row in w.detach().flatten(1))


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (QuantAware, {"bits": 0}, r"bits=0 is out of range: expected a value in \[2, 8\]"),
        (QuantAware, {"bits": 9}, r"bits=9 is out of range: expected a value in \[2, 8\]"),
        (QuantAware, {"bits": 4.5}, r"bits=4.5: expected an integer"),
        (QuantAware, {"act_bits": 1}, r"act_bits=1 is out of range"),
        (QuantAware, {"weight_range": "l2"}, r"weight_range='l2'"),
        (QuantAware, {"per_layer_bits": {"fc": 16}}, r"per_layer_bits\['fc'\]=16 is out of range"),
        (QuantizeInt8, {"calibration": "entropy"}, r"calibration='entropy': expected one of minmax, percentile, mse"),
        (QuantizeInt8, {"percentile": 101.0}, r"percentile=101.0 is out of range"),
        (QuantizeInt8, {"calib_batches": 0}, r"calib_batches=0 is out of range"),
        (QuantizeInt8, {"per_layer_bits": {"fc": 1}}, r"per_layer_bits\['fc'\]=1 is out of range"),
    ],
)
def test_config_validation(cls, kwargs, match):
    with pytest.raises(OpConfigError, match=match):
        cls(**kwargs)


def test_configs_round_trip_and_phases():
    for cfg in (QuantizeInt8(calibration="mse"), QuantAware(bits=4, per_layer_bits={"fc": 8})):
        assert config_from_dict(cfg.to_dict()) == cfg
    assert (QuantizeInt8.phase, QuantAware.phase) == ("post", "train")


def test_unknown_layer_names_and_missing_data_are_config_errors():
    m = _model()
    with pytest.raises(OpConfigError, match=r"\['nope'\].*its layers are: stem.0, layers.0.conv1"):
        apply(m, QuantAware(bits=4, per_layer_bits={"nope": 4}), _data(1))
    with pytest.raises(OpConfigError, match=r"pass OpData\(example=..., batches=...\)"):
        apply(m, QuantizeInt8(), OpData(example=torch.randn(1, 1, 28, 28)))


def test_choose_range_methods_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(1.5).sample((50_000,))
    for signed, xs in ((True, x), (False, x.relu())):
        lo_m, hi_m = choose_range(xs, "minmax", signed=signed)
        lo_p, hi_p = choose_range(xs, "percentile", signed=signed, percentile=99.9)
        lo_e, hi_e = choose_range(xs, "mse", signed=signed)
        assert hi_m == pytest.approx(float(xs.abs().max()))
        assert hi_p < 0.5 * hi_m and hi_e < hi_m
        if signed:
            assert (lo_m, lo_p, lo_e) == (-hi_m, -hi_p, -hi_e)
        else:
            assert lo_m == lo_p == lo_e == 0.0
    # 4 bits clip harder than 8: fewer levels make rounding error dominate
    assert choose_range(x, "mse", signed=True, bits=4)[1] < choose_range(x, "mse", signed=True, bits=8)[1]


def test_range_observer_is_bounded_and_exact_for_minmax():
    obs = RangeObserver(max_samples=1000)
    for i in range(5):
        obs.observe(torch.arange(4000, dtype=torch.float32) + 10_000 * i)
    assert obs._values.numel() == 1000
    assert obs.range("minmax", bits=8, signed=False) == (0.0, 43_999.0)
    # the subsample spreads over all batches, not only the last ones
    assert obs._values.min() < 10_000 and obs._values.max() > 40_000


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
def test_bn_folding_preserves_outputs(name):
    m = _model(name)
    f = copy.deepcopy(m)
    folded = fold_batchnorm(f)
    n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert len(folded) == n_bn and not any(isinstance(mod, nn.BatchNorm2d) for mod in f.modules())
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
def test_ptq_keeps_top1_and_quantizes_every_layer(name):
    m = _model(name)
    before = copy.deepcopy(m.state_dict())
    res = apply(m, QuantizeInt8(calibration="percentile"), _data())
    q = res.model
    layers = [mod for mod in q.modules() if isinstance(mod, QuantConv2d | QuantLinear)]
    assert len(layers) == res.report["layers_quantized"] == sum(isinstance(mod, nn.Conv2d | nn.Linear) for mod in m.modules())
    assert res.report["weight_bits"] == 8 and weight_bits(q) == 8.0 and res.report["calib_images"] == 96
    assert not q.training
    x = torch.randn(256, 1, 28, 28)
    with torch.no_grad():
        agree = (q(x).argmax(1) == m(x).argmax(1)).float().mean()
    assert agree >= 0.9
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # input model untouched


def test_weights_take_at_most_2_to_the_bits_values_per_channel():
    w = torch.randn(16, 8, 3, 3)
    for bits in (2, 3, 4, 8):
        assert _distinct_per_channel(quantize_weight_per_channel(w, bits)) <= 2**bits
        assert _distinct_per_channel(quantize_weight_per_channel(w, bits, "mse")) <= 2**bits
    # MSE clipping lowers the weight error at low bits
    err = {r: float((quantize_weight_per_channel(w, 3, r) - w).pow(2).sum()) for r in ("max", "mse")}
    assert err["mse"] < err["max"]


def test_per_layer_bits_are_honoured():
    m = _model()
    res = apply(m, QuantAware(bits=4, per_layer_bits={"fc": 2, "stem.0": 8}), _data(1))
    mods = dict(res.model.named_modules())
    assert (mods["fc"].weight_bits, mods["stem.0"].weight_bits, mods["layers.1.conv1"].weight_bits) == (2, 8, 4)
    assert _distinct_per_channel(mods["fc"].quant_weight()) <= 4
    assert _distinct_per_channel(mods["layers.1.conv1"].quant_weight()) <= 16
    assert 2 < weight_bits(res.model) < 8 and res.report["weight_bits"] == pytest.approx(weight_bits(res.model))
    plain = to_plain(res.model)
    assert type(plain.fc) is nn.Linear and plain.fc.weight_bits == 2
    assert _distinct_per_channel(plain.fc.weight) <= 4
    assert weight_bits(plain) == pytest.approx(weight_bits(res.model))
    # to_plain keeps the architecture's state_dict keys: the checkpoint loader rebuilds it strictly
    assert set(plain.state_dict()) == set(m.state_dict())


def _toy_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()  # top half brighter than bottom
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2),
    )
    return net, x, y


def test_qat_trains_through_the_rounding():
    torch.manual_seed(0)
    net, x, y = _toy_problem()
    res = apply(net, QuantAware(bits=3, act_bits=4), OpData(example=x[:1], batches=[(x[:64], y[:64])]))
    q = res.model.train()
    assert res.hooks == []
    conv = q[0]
    lo0, hi0 = float(conv.act_lo), float(conv.act_hi)
    opt = torch.optim.SGD(q.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(40):
        i = (step % 4) * 32
        loss = F.cross_entropy(q(x[i : i + 32] * 2.0), y[i : i + 32])  # inputs wider than calibrated
        opt.zero_grad()
        loss.backward()
        if step == 0:  # the straight-through estimator lets every quantized weight learn
            assert conv.weight.grad.abs().sum() > 0 and q[5].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert float(conv.act_hi) > hi0 and float(conv.act_lo) < lo0  # the EMA followed the wider inputs
    q.eval()
    frozen = (float(conv.act_lo), float(conv.act_hi))
    with torch.no_grad():
        q(x * 10.0)
    assert (float(conv.act_lo), float(conv.act_hi)) == frozen  # eval mode does not move ranges
    assert _distinct_per_channel(conv.quant_weight()) <= 8


def test_qat_under_fit_then_plain_model_holds_the_quantized_weights():
    net, x, y = _toy_problem()
    res = apply(net, QuantAware(bits=4), OpData(example=x[:1], batches=[(x, y)]))
    history = fit(res.model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)], TrainSpec(epochs=2, lr=0.05),
                  hooks=res.hooks)
    assert len(history) == 2 and not res.model.training
    qw = res.model[0].quant_weight().detach().clone()
    plain = to_plain(res.model).eval()
    assert type(plain[0]) is nn.Conv2d and torch.equal(plain[0].weight, qw)
    with torch.no_grad():
        # only the input rounding differs from the fake-quant model
        assert (plain(x).argmax(1) == res.model.eval()(x).argmax(1)).float().mean() >= 0.9


def test_qat_mse_weight_range_clips_and_lowers_weight_error():
    m = _model()
    res = {r: apply(m, QuantAware(bits=3, weight_range=r), _data(1)).model for r in ("max", "mse")}
    conv = {r: q.get_submodule("layers.1.conv1") for r, q in res.items()}
    assert torch.all(conv["max"].weight_clip == 1) and conv["mse"].weight_clip.max() <= 1
    assert conv["mse"].weight_clip.min() < 1
    w = conv["max"].weight
    err = {r: float((c.quant_weight() - w).pow(2).sum().detach()) for r, c in conv.items()}
    assert err["mse"] < err["max"]


def test_quantized_state_dict_is_the_integer_model_and_packs_small():
    from compression_ops.packing import pack_state_dict
    from compression_ops.quantize import QuantConv2d, quantized_state_dict

    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, width=16).eval()
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))]
    fp32_bytes = len(pack_state_dict(m.state_dict()))
    for bits, min_ratio in ((8, 3.7), (4, 6.5)):
        q = apply(m, QuantAware(bits=bits), OpData(example=torch.randn(1, 1, 28, 28), batches=batches)).model.eval()
        sd = quantized_state_dict(q)
        conv = q.layers[2].conv2
        assert isinstance(conv, QuantConv2d) and sd["layers.2.conv2.weight"].dtype == torch.int8
        codes, scale = sd["layers.2.conv2.weight"], sd["layers.2.conv2.weight_scale"]
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        # codes x scales are the weights the quantized model computes with
        torch.testing.assert_close(codes.float() * scale.view(-1, 1, 1, 1), conv.quant_weight().detach(),
                                   rtol=0, atol=1e-6)
        assert fp32_bytes / len(pack_state_dict(sd)) >= min_ratio
