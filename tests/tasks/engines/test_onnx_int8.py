from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compression_ops.quant_ranges import choose_range
from tasks.engines.onnx_int8 import (
    _name_nodes,
    activation_ranges,
    int8_kernel_ops,
    optimized_op_types,
    quantize_onnx_int8,
    stem_convs,
)
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


def test_writes_checked_file_and_meta(fp32, int8):
    out, meta = int8
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.int8.meta.json", "model.int8.onnx", "model.meta.json", "model.onnx"]  # no temporary left
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert json.loads(meta_path(out).read_text()) == meta
    assert meta["file_bytes"] == out.stat().st_size and meta["calibration"] == "percentile"
    # the weights are stored as 8-bit integers, but for the stem conv's, which stays fp32
    ints = [i for i in onnx.load(str(out)).graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(ints) == 1  # the second conv
    assert meta["float_nodes"] == stem_convs(onnx.load(str(fp32))) and len(meta["float_nodes"]) == 1


def test_runs_int8_kernels_and_agrees_with_fp32(fp32, int8):
    out, meta = int8
    assert "QLinearConv" in int8_kernel_ops(out) and "QLinearConv" in meta["int8_ops"]
    assert not set(int8_kernel_ops(fp32))
    assert meta["top1_agreement"] >= 0.98
    runner = load_onnx(out, threads=1)  # checks the sha256 in the sidecar
    x = np.random.default_rng(5).standard_normal((64, 1, 8, 8)).astype(np.float32)  # calibration-like
    ref = load_onnx(fp32, threads=1).run(x)
    assert (runner.run(x).argmax(1) == ref.argmax(1)).mean() >= 0.98
    assert runner.input_shape == (None, 1, 8, 8)


def test_stem_stays_float_and_the_rest_runs_fused_int8(fp32, int8):
    out, _ = int8
    ops = optimized_op_types(out)
    # the stem (1 input channel: a 9-tap reduction, slower and least accurate in int8) runs as a float conv,
    # every other conv, the residual add and the classifier as fused integer kernels
    assert ops["QLinearConv"] == 1 and ops["Conv"] + ops["FusedConv"] == 1
    assert ops["QLinearAdd"] == 1 and ops["QGemm"] == 1
    assert ops["QuantizeLinear"] <= 2 and ops["DequantizeLinear"] <= 2  # no unfused Q/DQ pairs left around convs
    stem = stem_convs(onnx.load(str(out)))
    assert stem == stem_convs(onnx.load(str(fp32)))  # still a Conv reading the input, with float weights
    conv = next(n for n in onnx.load(str(out)).graph.node if n.name == stem[0])
    assert conv.input[1] in {i.name for i in onnx.load(str(out)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT}


def test_float_stem_off_quantizes_every_conv(fp32, tmp_path):
    out = tmp_path / "all.int8.onnx"
    meta = quantize_onnx_int8(fp32, out, CALIB, method="minmax", float_stem=False)
    assert meta["float_nodes"] == []
    ops = optimized_op_types(out)
    assert ops["QLinearConv"] == 2 and ops["Conv"] + ops["FusedConv"] == 0
    assert meta["top1_agreement"] >= 0.9


def test_unnamed_nodes_get_names_so_the_stem_can_be_excluded(fp32, tmp_path):
    model = onnx.load(str(fp32))
    for n in model.graph.node:
        n.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, str(path))
    stem = _name_nodes(path)
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert len(stem) == 1 and stem == stem_convs(onnx.load(str(path)))


def test_activation_ranges_are_ours(fp32, int8):
    out, _ = int8
    ranges = activation_ranges(fp32, CALIB, "percentile")
    lo, hi = choose_range(torch.from_numpy(CALIB), "percentile", signed=False)
    assert ranges["input"] == pytest.approx((lo, hi))
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # ONNX Runtime's quantizer took the overrides: scale = (hi - lo) / 255 for every uint8 activation
    # (the input itself feeds the float stem, so its first quantized tensor is the stem's output)
    quantized = [(n.input[0], n.input[1]) for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] in ranges]
    assert len(quantized) >= 4  # the stem's output, the second conv's, the add's, the pooled features
    for x, scale in quantized:
        lo, hi = min(ranges[x][0], 0.0), max(ranges[x][1], 0.0)
        assert float(inits[scale]) == pytest.approx((hi - lo) / 255, rel=1e-5)
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
