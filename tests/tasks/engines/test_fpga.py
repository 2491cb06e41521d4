"""FPGA flow: a small int8 CNN as an hls4ml project, run by its bit-accurate C simulation (g++)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

hls4ml = pytest.importorskip("hls4ml", reason="hls4ml is not installed (pip install 'hls4ml>=1.3,<1.4')")

from compression_ops.base import OpData, apply  # noqa: E402
from compression_ops.finetune import TrainSpec, fit  # noqa: E402
from compression_ops.quantize import QuantizeInt8  # noqa: E402
from tasks.config import DataConfig  # noqa: E402
from tasks.data import build_dataset  # noqa: E402
from tasks.data.loaders import Splits  # noqa: E402
from tasks.engines.base import InputShapeError  # noqa: E402
from tasks.engines.fpga import (  # noqa: E402
    agreement,
    build_hls,
    emulate,
    estimate_resources,
    load_hls,
    prepare_for_hls,
    quantize_input,
)
from tasks.errors import ArtifactError, StageError  # noqa: E402


class SmallNet(nn.Module):
    """Stem conv-bn-relu, an identity residual block, a strided conv with no ReLU after it (so the
    classifier's input quantizer has a non-zero zero point), adaptive average pooling, linear."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, groups: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = F.relu(self.bn(self.conv(y)) + y)
        y = self.bn_down(self.down(y))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture(scope="module")
def digits() -> Splits:
    return Splits(build_dataset(DataConfig(source="digits")))


def _int8(model: nn.Module, sp: Splits) -> nn.Module:
    data = OpData(example=sp.example(1), batches=sp.batches("train", 64, train=True, seed=1))
    return apply(model, QuantizeInt8(calibration="minmax"), data).model


@pytest.fixture(scope="module")
def quantized(digits) -> tuple[nn.Module, dict]:
    """SmallNet trained on 8x8 digits for a few seconds, then int8 post-training quantized."""
    torch.manual_seed(0)
    model = SmallNet()
    fit(model, digits.batches("train", 64, train=True), TrainSpec(epochs=6, lr=0.1, schedule="onecycle"))
    data = OpData(example=digits.example(1), batches=digits.batches("train", 64, train=True, seed=1))
    res = apply(model.eval(), QuantizeInt8(calibration="minmax"), data)
    return res.model, res.report


@pytest.fixture(scope="module")
def project(quantized, digits, tmp_path_factory) -> tuple[Path, dict]:
    qm, report = quantized
    out = tmp_path_factory.mktemp("fpga") / "hls"
    return out, build_hls(qm, digits.example(1), out, quant=report)


def test_quantize_input_is_torchs_fake_quant():
    x = np.random.default_rng(0).normal(0, 2, (4, 1, 8, 8)).astype(np.float32)
    x[0, 0, 0, :3] = [0.5, 1.5, 2.5]  # ties: round half to even
    q = {"scale": 0.0625, "zero_point": 37, "bits": 8}
    ref = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), 0.0625, 37, 0, 255).numpy()
    np.testing.assert_array_equal(quantize_input(x, q) * 0.0625, ref)


def test_rewrite_matches_the_quantized_model(quantized, digits):
    """The HLS-ready graph (codes, quantizers, rescales) in PyTorch agrees with the fake-quant model."""
    qm, _ = quantized
    prep = prepare_for_hls(qm, digits.example(1))
    roles = {r[0] for r in prep.roles.values()}
    assert {"codes", "rescale", "quantize", "shift", "clamp", "unshift"} <= roles  # fc input: zero point != 0
    assert any("AdaptiveAvgPool2d" in c for c in prep.changes)
    x, _ = digits.tensors["test"]
    with torch.inference_mode():
        ref = qm(x).numpy()
    got = emulate(prep, x.numpy())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert np.abs(got - ref).max() < 0.1
    kinds = [type(m).__name__ for m in qm.modules()]
    assert kinds.count("QuantConv2d") == 3 and kinds.count("QuantLinear") == 1  # the model is left as it was


def test_float_or_unsupported_models_are_refused_and_leave_nothing(digits, tmp_path):
    out = tmp_path / "hls"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier build")
    with pytest.raises(StageError, match="needs a quantized model"):
        build_hls(SmallNet().eval(), digits.example(1), out)
    with pytest.raises(StageError, match="groups=1"):
        build_hls(_int8(SmallNet(groups=8).eval(), digits), digits.example(1), out)
    with pytest.raises(StageError, match="PyTorch frontend cannot convert.*ReLU6"):
        build_hls(_int8(SmallNet(act=nn.ReLU6).eval(), digits), digits.example(1), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hls"]  # no temporary project left beside it
    assert (out / "keep.txt").read_text() == "an earlier build"  # a failed build replaces nothing


@pytest.mark.slow
def test_csim_agrees_with_quantized_pytorch(project, quantized, digits):
    out, meta = project
    qm, _ = quantized
    runner = load_hls(out)
    x, y = digits.tensors["test"]
    logits = runner.run(x.numpy())
    assert logits.shape == (len(y), 10) and logits.dtype == np.float32
    res = agreement(runner, qm, x.numpy(), y.numpy())
    assert res["n"] == len(y) >= 300
    assert res["top1_agreement"] >= 0.99, res
    assert res["reference_accuracy"] > 60.0  # a trained model, not a constant one
    assert abs(res["accuracy"] - res["reference_accuracy"]) <= 1.0
    with torch.inference_mode():
        ref = qm(x).numpy()
    assert agreement(runner, ref, x.numpy())["top1_agreement"] == res["top1_agreement"]  # logits reference


@pytest.mark.slow
def test_project_files_and_meta(project):
    out, meta = project
    assert sorted(p.name for p in out.parent.iterdir()) == ["hls"]  # built beside, renamed: no temporary left
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (out / "firmware" / "shrinkflow_fpga.cpp").is_file() and (out / "build_prj.tcl").is_file()
    lib = out / meta["library"]
    assert lib.is_file() and meta["library_sha256"] and meta["compile_seconds"] > 0
    assert meta["hls4ml_version"] == hls4ml.__version__
    assert meta["backend"] == "Vitis" and meta["io_type"] == "io_stream" and meta["part"]
    assert "vendor tools" in meta["synthesis"] and "Vitis HLS" in meta["synthesis"]
    prec = meta["precisions"]
    assert prec["conv"]["weight"] == "ap_fixed<8,8>"  # int8 weight codes, exact
    assert prec["conv_quant"]["result"] == "ap_ufixed<8,8,AP_RND_CONV,AP_SAT>"  # uint8 activations
    assert prec["x"]["result"].startswith("ap_fixed<9,9")  # input codes q - zero point
    assert meta["quant"]["op"] == "quantize_int8"


@pytest.mark.slow
def test_resource_estimate_is_labelled_and_consistent(project):
    out, meta = project
    est = estimate_resources(out)
    assert est == meta["estimate"]
    assert "estimate" in est["kind"] and "Vivado" in est["kind"]
    t = est["totals"]
    assert t["multipliers"] > 0 and t["lut_multipliers"] < t["multipliers"] <= t["dsp"] + t["lut_multipliers"]
    lo, hi = est["latency_cycles"]
    assert est["interval_cycles"] <= lo <= hi
    assert est["latency_us"][0] == pytest.approx(lo * meta["clock_period_ns"] / 1000)
    convs = [r for r in est["layers"] if r["class"] in ("Conv2D", "Dense")]
    assert convs and all(r["multipliers"] >= 1 for r in convs)


@pytest.mark.slow
def test_wrong_input_shape_is_refused(project):
    runner = load_hls(project[0])
    with pytest.raises(InputShapeError, match=r"expects input shape \(N, 1, 8, 8\), got \(2, 1, 9, 9\)"):
        runner.run(np.zeros((2, 1, 9, 9), dtype=np.float32))
    with pytest.raises(InputShapeError):
        runner.run(np.zeros((1, 8, 8), dtype=np.float32))


@pytest.mark.slow
def test_missing_corrupt_or_mismatched_project_is_refused(project, tmp_path):
    src, meta = project
    with pytest.raises(ArtifactError, match="is missing; rebuild it"):
        load_hls(tmp_path / "nothing")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    no_meta = copy("no_meta")
    (no_meta / "meta.json").unlink()
    with pytest.raises(ArtifactError, match=r"meta\.json is missing"):
        load_hls(no_meta)

    bad_meta = copy("bad_meta")
    (bad_meta / "meta.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_hls(bad_meta)

    corrupt = copy("corrupt")
    lib = corrupt / meta["library"]
    data = bytearray(lib.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256.*corrupt or from another build"):
        load_hls(corrupt)

    no_lib = copy("no_lib")
    (no_lib / meta["library"]).unlink()
    with pytest.raises(ArtifactError, match="C-simulation library .* is missing"):
        load_hls(no_lib)

    edited = copy("edited")
    weights = sorted((edited / "firmware" / "weights").glob("w*.h"))[0]
    weights.write_text(weights.read_text().replace("1", "2", 1))
    with pytest.raises(ArtifactError, match="do not match the ones the C simulation was compiled from"):
        load_hls(edited)
