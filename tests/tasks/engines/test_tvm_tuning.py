"""Channel padding, vector width detection and the per-kernel tuner behind the fast TVM builds."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from compression_ops.base import OpData
from compression_ops.channel_prune import ChannelPrune, channel_prune
from tasks.engines.pad_channels import pad_channels
from tasks.models import create_model


def _randomize_bn(bn_stats, model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    return bn_stats(model, mean=1.0, bias=1.0)


@pytest.fixture(scope="module")
def pruned(bn_stats) -> tuple[nn.Module, torch.Tensor]:
    """A ResNet-8 pruned to odd widths (11, 22, 45 channels), with non-trivial BN statistics."""
    torch.manual_seed(0)
    base = create_model("resnet8", in_channels=1, num_classes=10, width=16).eval()
    ex = torch.randn(2, 1, 28, 28)
    model = channel_prune(copy.deepcopy(base), ChannelPrune(target_macs_reduction=2.0), OpData(example=ex)).model
    return _randomize_bn(bn_stats, model), ex


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("multiple", [4, 8, 16])
def test_padding_widens_every_group_and_keeps_the_logits(pruned, multiple):
    model, ex = pruned
    assert any(w % 8 for w in _widths(model))  # the fixture really has odd widths
    padded, report = pad_channels(model, ex, multiple)
    assert report["padded"] and report["max_abs_diff"] < 1e-4
    assert all(w % multiple == 0 for w in _widths(padded))
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        np.testing.assert_allclose(padded(x).numpy(), model(x).numpy(), atol=1e-4)
    assert _widths(model) != _widths(padded)  # the original is untouched
    assert {g["to"] % multiple for g in report["groups"]} == {0}


def test_padding_a_depthwise_model_is_exact(bn_stats):
    torch.manual_seed(0)
    base = create_model("mobilenet_tiny", in_channels=1, num_classes=10).eval()
    ex = torch.randn(2, 1, 28, 28)
    model = _randomize_bn(bn_stats, channel_prune(copy.deepcopy(base), ChannelPrune(ratio=0.3), OpData(example=ex)).model)
    padded, report = pad_channels(model, ex, 8)
    assert report["padded"]
    dw = [m for m in padded.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels and m.out_channels % 8 == 0 for m in dw)
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        np.testing.assert_allclose(padded(x).numpy(), model(x).numpy(), atol=1e-4)


def test_nothing_to_pad_returns_the_same_model(tiny_model, tiny_example):
    model, report = pad_channels(tiny_model, tiny_example, 8)  # widths are 8 already
    assert model is tiny_model and not report["padded"] and "already" in report["reason"]


def test_unknown_parametric_layer_is_left_unpadded(tiny_example):
    class WithPReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 5, 3, padding=1)
            self.act = nn.PReLU(5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3)))

    model = WithPReLU().eval()
    out, report = pad_channels(model, tiny_example, 8)
    assert out is model and not report["padded"] and "no padding rule" in report["reason"]


def test_vector_lanes_come_from_cpu_features():
    import tvm

    from tasks.engines.tvm_schedule import vector_lanes

    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 16
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})) == 8  # AVX2: LLVM says 512 bits
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 8
    assert vector_lanes(tvm.target.Target({"kind": "llvm"})) == 4
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert vector_lanes(tvm.target.Target(arm)) == 4


def test_padded_build_matches_torch_and_records_the_padding(pruned, tmp_path):
    from tasks.engines.tvm_build import build_tvm, load_tvm

    model, ex = pruned
    meta = build_tvm(model, ex, {"kind": "llvm", "mcpu": "native"}, tmp_path / "tvm")
    assert meta["channel_padding"]["padded"] and meta["max_abs_diff"] < 1e-3
    runner = load_tvm(tmp_path / "tvm")
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        np.testing.assert_allclose(runner.run(x.numpy()), model(x).numpy(), atol=1e-3)


def test_tuner_fills_then_reuses_its_database(tiny_model, tiny_example, tmp_path):
    from tasks.engines.tvm_build import build_tvm, load_tvm
    from tasks.engines.tvm_tune import TuningDB

    db = tmp_path / "tuning" / "host.json"
    meta = build_tvm(tiny_model, tiny_example, {"kind": "llvm", "mcpu": "native"}, tmp_path / "a",
                     batch_sizes=(1, 32), tuning_db=db, tuning_budget_s=900)
    t = meta["tuning"]
    assert t["tuned"] >= 2 and t["from_db"] == 0 and t["left_default"] == 0
    assert t["candidates_timed"] > t["tuned"]
    entries = json.loads(db.read_text())["entries"]
    assert len(entries) == t["tuned"]
    for e in entries.values():
        # every candidate timed at both batch sizes; the chosen knobs are the fastest by summed log-time
        assert all(set(ms) == {"1", "32"} and min(ms.values()) > 0 for ms in e["ms"].values())
        score = {k: sum(np.log(v) for v in ms.values()) for k, ms in e["ms"].items()}
        assert f"acc{e['knobs']['accumulators']}-{e['knobs']['row_split']}" == min(score, key=score.get)
    x = np.random.default_rng(0).standard_normal((4, *tiny_example.shape[1:])).astype(np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(load_tvm(tmp_path / "a").run(x), tiny_model(torch.from_numpy(x)).numpy(), atol=1e-4)

    # A second build (a nightly run) reads every kernel from the database and times nothing.
    again = build_tvm(tiny_model, tiny_example, {"kind": "llvm", "mcpu": "native"}, tmp_path / "b",
                      tuning_db=db, tuning_budget_s=900)["tuning"]
    assert again["from_db"] == t["tuned"] and again["tuned"] == 0 and again["candidates_timed"] == 0
    assert TuningDB(db).entries == entries


def test_zero_budget_and_a_broken_database(tiny_model, tiny_example, tmp_path):
    from tasks.engines.tvm_build import build_tvm

    db = tmp_path / "host.json"
    db.write_text("{not json")
    meta = build_tvm(tiny_model, tiny_example, {"kind": "llvm", "mcpu": "native"}, tmp_path / "a",
                     tuning_db=db, tuning_budget_s=0)
    # nothing to time and nothing to read: the kernels are not even extracted (that was most of a compile)
    assert meta["tuning"]["tuned"] == 0 and meta["tuning"]["kernels"] is None and meta["tuning"]["skipped"]
    assert meta["max_abs_diff"] < 1e-3


def test_tuned_knobs_that_compute_wrong_are_dropped_for_the_default_schedule(tiny_model, tiny_example, tmp_path,
                                                                             monkeypatch):
    """A tuned build whose outputs disagree with PyTorch is rebuilt with default knobs (seen once: a tuned
    MobileNetV3 kernel 0.08 off), and the metadata says so; only a wrong default build is an error."""
    import tasks.engines.tvm_build as tb
    import tasks.engines.tvm_tune as tt

    real = tb._compile_and_check
    monkeypatch.setattr(tt, "tune", lambda *a, **k: ({"fused_conv2d": object()}, {"tuned": 1, "from_db": 0,
                                                                                  "left_default": 0, "seconds": 1.0}))

    def check(mod, model, example, target, tvm_target, knobs, out_dir, batch_sizes, fcompile):
        if knobs:  # what a wrong tuned kernel looks like from here
            return out_dir / tb.LIBRARY, {"1": 0.08}
        return real(mod, model, example, target, tvm_target, knobs, out_dir, batch_sizes, fcompile)

    monkeypatch.setattr(tb, "_compile_and_check", check)
    meta = tb.build_tvm(tiny_model, tiny_example, {"kind": "llvm", "mcpu": "native"}, tmp_path / "a",
                        batch_sizes=(1,), tuning_db=tmp_path / "db.json", tuning_budget_s=5)
    assert meta["max_abs_diff"] < 1e-3 and "default knobs used" in meta["tuning"]["rejected"]
    assert "default knobs" in meta["pipeline"] and "default schedule (tuned knobs gave" in tb._tuning_line(meta)
