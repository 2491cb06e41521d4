"""The package a registered version serves: the engine deploy.json chose per batch size, its fallbacks
with a warning, raw-pixel input, and the pyfunc's input forms. Built by hand from the real engines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.engines.pytorch_eager import TorchRunner
from tasks.errors import ArtifactError
from tasks.serving import Package, ShrinkflowModel, as_batch, package_dir, package_sha256

MEAN, STD = [0.3], [0.2]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """model.pt, compiled/model.onnx and compiled/host (TVM); deploy.json: ONNX Runtime at batch 1, TVM from 4."""
    from tasks.engines.onnx_runtime import export_onnx
    from tasks.engines.tvm_build import build_tvm
    from tasks.models.checkpoint import save_checkpoint
    from tasks.models.user import build_arch

    root = tmp_path_factory.mktemp("pkg") / "model"
    torch.manual_seed(0)
    arch = {"name": "resnet8", "kwargs": {"width": 4}}
    model = build_arch(arch, in_channels=1, num_classes=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    save_checkpoint(model, root / "model.pt", arch=arch, input_shape=[1, 8, 8], num_classes=4)
    example = torch.randn(1, 1, 8, 8)
    export_onnx(model, example, root / "compiled" / "model.onnx")
    build_tvm(model, example, {"kind": "llvm"}, root / "compiled" / "host", batch_sizes=(1, 4), pad_channels=False)
    (root / "deploy.json").write_text(json.dumps({"host": {
        "1": {"engine": "onnxruntime", "artifact": "compiled/model.onnx"},
        "4": {"engine": "tvm", "artifact": "compiled/host/model.so"}}}))
    (root / "serving.json").write_text(json.dumps({"input_shape": [1, 8, 8], "num_classes": 4, "mean": MEAN,
                                                   "std": STD, "threads": 1}))
    return root, model


def _copy(package, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(package[0], dest)
    return dest


def test_the_chosen_engine_runs_per_batch_size_and_matches_pytorch(package):
    root, model = package
    pkg = Package(root)
    assert [pkg.engine_for(b) for b in (1, 2, 4, 100)] == ["onnxruntime", "onnxruntime", "tvm", "tvm"]
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32)
    ref = TorchRunner(model).run(x)
    np.testing.assert_allclose(pkg.run(x), ref, atol=1e-4)
    np.testing.assert_allclose(pkg.run(x[:1]), ref[:1], atol=1e-4)
    assert not pkg.fallbacks
    assert pkg.artifact_bytes(1) == (root / "compiled/model.onnx").stat().st_size


def test_an_engine_that_cannot_load_falls_back_with_a_warning(package, tmp_path):
    root = _copy(package, tmp_path)
    (root / "compiled/host/model.so").write_bytes(b"not a library")  # sha256 no longer matches meta.json
    with pytest.warns(RuntimeWarning, match="engine tvm cannot load here .*using onnxruntime instead"):
        pkg = Package(root)
    assert pkg.engine_for(32) == "onnxruntime"
    assert pkg.fallbacks[0]["chosen"] == "tvm" and "sha256" in pkg.fallbacks[0]["why"]
    x = np.zeros((4, 1, 8, 8), np.float32)
    np.testing.assert_allclose(pkg.run(x), TorchRunner(package[1]).run(x), atol=1e-4)


def test_pytorch_is_the_last_fallback_and_then_a_clear_error(package, tmp_path):
    root = _copy(package, tmp_path)
    shutil.rmtree(root / "compiled")
    with pytest.warns(RuntimeWarning, match="using pytorch instead"):
        pkg = Package(root)
    assert {pkg.engine_for(1), pkg.engine_for(4)} == {"pytorch"}
    (root / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="no engine of .* loads here: onnxruntime: .*; tvm: .*; pytorch: "):
        Package(root)


def test_raw_pixels_are_normalised_inside(package):
    root, model = package
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 1, 8, 8)).astype(np.float32)
    py = ShrinkflowModel()
    py.package = Package(root)
    ref = TorchRunner(model).run(((pixels / 255 - MEAN[0]) / STD[0]).astype(np.float32))
    np.testing.assert_allclose(py.predict(None, pixels, {"pixels": True}), ref, atol=1e-4)


def test_input_forms(package):
    import pandas as pd

    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    flat = pd.DataFrame({"image": [r.reshape(-1).tolist() for r in x]})
    wide = pd.DataFrame(x.reshape(2, -1))
    for form in (x, x.reshape(2, -1), flat, wide, x.tolist()):
        np.testing.assert_array_equal(as_batch(form, [1, 8, 8]), x)
    with pytest.raises(ArtifactError, match=r"expected input \[N, 1, 8, 8\]"):
        as_batch(np.zeros((2, 3, 8)), [1, 8, 8])


def test_an_older_plain_folder_package_still_loads(package, tmp_path):
    """Versions registered before serving.json: shape from the checkpoint; raw pixels need mean/std."""
    root = _copy(package, tmp_path)
    (root / "serving.json").unlink()
    assert package_dir(root) == root
    pkg = Package(root)
    assert pkg.info["input_shape"] == [1, 8, 8] and pkg.info["num_classes"] == 4
    with pytest.raises(ArtifactError, match="records no mean/std"):
        pkg.normalise(np.zeros((1, 1, 8, 8)))


def test_package_hash_follows_content(package, tmp_path):
    root = _copy(package, tmp_path)
    before = package_sha256(root)
    assert before == package_sha256(package[0])
    (root / "metrics.json").write_text("{}")
    assert package_sha256(root) != before
