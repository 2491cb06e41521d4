from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tasks.engines.base import InputShapeError
from tasks.engines.onnx_runtime import export_onnx, load_onnx, meta_path
from tasks.engines.pytorch_eager import TorchRunner, load_eager
from tasks.errors import ArtifactError


@pytest.fixture(scope="module")
def exported(tiny_model, tiny_example, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    meta = export_onnx(tiny_model, tiny_example, path)
    return path, meta


def test_single_checked_file_and_meta(exported):
    path, meta = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.meta.json", "model.onnx"]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert json.loads(meta_path(path).read_text()) == meta
    assert meta["input_shape"] == [None, 1, 8, 8]
    assert meta["max_abs_diff"] < 1e-4
    assert set(meta["max_abs_diff_by_batch"]) == {"1", "32"}


@pytest.mark.parametrize("batch", [1, 32])
def test_outputs_match_torch(exported, tiny_model, batch):
    runner = load_onnx(exported[0], threads=1)
    x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        ref = tiny_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.run(x), ref, atol=1e-4, rtol=0)
    assert runner.input_shape == (None, 1, 8, 8)


def test_wrong_input_shape_names_expected_and_got(exported):
    runner = load_onnx(exported[0], threads=1)
    with pytest.raises(InputShapeError, match=r"expects input shape \(N, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        runner.run(np.zeros((2, 3, 8, 8), np.float32))


def test_corrupt_file_is_rejected(exported, tmp_path):
    bad = tmp_path / "model.onnx"
    data = bytearray(exported[0].read_bytes())
    data[: len(data) // 2] = b"\x07" * (len(data) // 2)
    bad.write_bytes(bytes(data))
    # Without a sidecar, ONNX Runtime's own parse error is turned into ours.
    with pytest.raises(ArtifactError, match="cannot load.*re-run the export stage"):
        load_onnx(bad, threads=1)
    # With the sidecar, the hash catches it before ONNX Runtime sees it.
    meta_path(bad).write_text(meta_path(exported[0]).read_text())
    with pytest.raises(ArtifactError, match="sha256.*re-run the export stage"):
        load_onnx(bad, threads=1)


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        load_onnx(tmp_path / "nope.onnx", threads=1)


def test_static_batch_export(tiny_model, tmp_path):
    meta = export_onnx(tiny_model, torch.randn(3, 1, 8, 8), tmp_path / "m.onnx", dynamic_batch=False)
    assert meta["input_shape"] == [3, 1, 8, 8]
    assert load_onnx(tmp_path / "m.onnx", threads=1).input_shape == (3, 1, 8, 8)


def test_eager_runner_matches_model(tiny_model):
    runner = load_eager(tiny_model, (None, 1, 8, 8))
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        ref = tiny_model(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(runner.run(x), ref)
    with pytest.raises(InputShapeError):
        runner.run(np.zeros((2, 1, 7, 8), np.float32))
    unchecked = TorchRunner(tiny_model)  # no input_shape: the model decides
    np.testing.assert_array_equal(unchecked.run(x.astype(np.float64)), ref)
