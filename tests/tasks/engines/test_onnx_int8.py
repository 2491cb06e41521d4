from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compression_ops.quant_ranges import choose_range
from tasks.engines.onnx_int8 import activation_ranges, int8_kernel_ops, quantize_onnx_int8
from tasks.engines.onnx_runtime import export_onnx, load_onnx, meta_path
from tasks.errors import ArtifactError

CALIB = np.random.default_rng(0).standard_normal((128, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def fp32(tiny_model, tiny_example, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    export_onnx(tiny_model, tiny_example, path)
    return path


@pytest.fixture(scope="module")
def int8(fp32) -> tuple[Path, dict]:
    out = fp32.with_name("model.int8.onnx")
    return out, quantize_onnx_int8(fp32, out, CALIB, method="percentile")


def test_writes_checked_file_and_meta(int8):
    out, meta = int8
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.int8.meta.json", "model.int8.onnx", "model.meta.json", "model.onnx"]  # no temporary left
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert json.loads(meta_path(out).read_text()) == meta
    assert meta["file_bytes"] == out.stat().st_size and meta["calibration"] == "percentile"
    # the weights are stored as 8-bit integers
    ints = [i for i in onnx.load(str(out)).graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(ints) == 2  # the two convs


def test_runs_int8_kernels_and_agrees_with_fp32(fp32, int8):
    out, meta = int8
    assert "QLinearConv" in int8_kernel_ops(out) and "QLinearConv" in meta["int8_ops"]
    assert not set(int8_kernel_ops(fp32))
    assert meta["top1_agreement"] >= 0.9
    runner = load_onnx(out, threads=1)  # checks the sha256 in the sidecar
    x = np.random.default_rng(5).standard_normal((64, 1, 8, 8)).astype(np.float32)  # calibration-like
    ref = load_onnx(fp32, threads=1).run(x)
    assert (runner.run(x).argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert runner.input_shape == (None, 1, 8, 8)


def test_activation_ranges_are_ours(fp32, int8):
    out, _ = int8
    ranges = activation_ranges(fp32, CALIB, "percentile")
    lo, hi = choose_range(torch.from_numpy(CALIB), "percentile", signed=False)
    assert ranges["input"] == pytest.approx((lo, hi))
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    # ONNX Runtime's quantizer took the override: scale = (hi - lo) / 255 for the uint8 input
    assert float(inits["input_scale"]) == pytest.approx((hi - lo) / 255, rel=1e-5)
    minmax = activation_ranges(fp32, CALIB, "minmax")
    assert minmax["input"] == pytest.approx((float(CALIB.min()), float(CALIB.max())))
    assert all(ranges[k][1] <= minmax[k][1] + 1e-6 for k in ranges)


def test_missing_or_corrupt_input_leaves_no_output(fp32, tmp_path):
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"stale")  # an earlier run's artifact must not survive a failed one
    meta_path(out).write_text("{}")
    with pytest.raises(ArtifactError, match=r"nothing\.onnx is missing; re-run the export stage"):
        quantize_onnx_int8(tmp_path / "nothing.onnx", out, CALIB)
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.onnx"
    data = bytearray(fp32.read_bytes())
    data[: len(data) // 2] = b"\x07" * (len(data) // 2)
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"cannot load .*bad\.onnx"):
        quantize_onnx_int8(bad, out, CALIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
