from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.engines.base import InputShapeError
from tasks.engines.tvm_build import build_tvm, load_tvm, resolve_target
from tasks.errors import ArtifactError, StageError

HOST = {"kind": "llvm", "mcpu": "native"}


@pytest.fixture(scope="module")
def built(tiny_model, tiny_example, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tvm")
    meta = build_tvm(tiny_model, tiny_example, HOST, out)
    return out, meta


@pytest.fixture
def copy_of_build(built, tmp_path) -> Path:
    out = tmp_path / "tvm"
    shutil.copytree(built[0], out)
    return out


def test_meta_describes_the_library(built):
    out, meta = built
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["input_shape"] == [None, 1, 8, 8]
    assert meta["target"]["mcpu"] not in ("native", "")
    assert len(meta["sha256"]) == 64
    assert meta["tvm_version"]
    assert meta["output_names"]
    assert set(meta["max_abs_diff_by_batch"]) == {"1", "32"}
    assert meta["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("batch", [1, 32, 5])
def test_outputs_match_torch(built, tiny_model, batch):
    runner = load_tvm(built[0])
    x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        ref = tiny_model(torch.from_numpy(x)).numpy()
    got = runner.run(x)
    assert got.shape == (batch, 4)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert runner.input_shape == (None, 1, 8, 8)


def test_wrong_input_shape_names_expected_and_got(built):
    runner = load_tvm(built[0])
    with pytest.raises(InputShapeError, match=r"expects input shape \(N, 1, 8, 8\), got \(1, 1, 9, 9\)"):
        runner.run(np.zeros((1, 1, 9, 9), np.float32))
    with pytest.raises(ValueError):  # also a ValueError, for callers that catch that
        runner.run(np.zeros((8, 8), np.float32))


def test_corrupt_library_is_rejected(copy_of_build):
    lib = copy_of_build / "model.so"
    data = bytearray(lib.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF  # flipping, not overwriting: the middle of a .so may already be zero padding
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.so.*sha256.*re-run the compile stage"):
        load_tvm(copy_of_build)


def test_swapped_library_is_rejected(copy_of_build):
    (copy_of_build / "model.so").write_bytes(b"not a library")
    with pytest.raises(ArtifactError, match="re-run the compile stage"):
        load_tvm(copy_of_build)


def test_missing_or_broken_meta(copy_of_build):
    (copy_of_build / "meta.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="meta.json is unreadable"):
        load_tvm(copy_of_build)
    (copy_of_build / "meta.json").unlink()
    with pytest.raises(ArtifactError, match="meta.json is missing"):
        load_tvm(copy_of_build)


def test_cross_target_without_compiler_says_what_to_install(tiny_model, tiny_example, tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.engines.tvm_build.shutil.which", lambda _: None)
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    with pytest.raises(StageError, match="aarch64-linux-gnu-gcc.*apt-get install gcc-aarch64-linux-gnu"):
        build_tvm(tiny_model, tiny_example, target, tmp_path, cross_compiler="aarch64-linux-gnu-gcc")
    assert not (tmp_path / "model.so").exists()


def test_native_mcpu_is_resolved():
    resolved = resolve_target({"kind": "llvm", "mcpu": "native"})
    assert resolved["mcpu"] and resolved["mcpu"] != "native"
    assert resolve_target({"kind": "llvm", "mcpu": "cortex-a72"})["mcpu"] == "cortex-a72"


class _FixedBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(2, -1).sum(1, keepdim=True)


def test_untraceable_model_gives_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="cannot capture _FixedBatch.*hard-coded batch"):
        build_tvm(_FixedBatch(), torch.randn(2, 1, 8, 8), HOST, tmp_path)


def test_wrong_outputs_fail_the_build(tiny_model, tiny_example, tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.engines.tvm_build.diff_vs_reference", lambda *a: {"1": 0.5})
    with pytest.raises(StageError, match="differs from PyTorch by 0.5"):
        build_tvm(tiny_model, tiny_example, HOST, tmp_path, batch_sizes=(1,))
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(ArtifactError, match="meta.json is missing"):
        load_tvm(tmp_path)


class _OddWidths(torch.nn.Module):
    """Pruned-style widths: below, above and not a multiple of a vector register, one prime (47)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        widths = [11, 24, 45, 47]
        layers, c = [], 1
        for w in widths:
            layers += [torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.BatchNorm2d(w), torch.nn.ReLU()]
            c = w
        self.features = torch.nn.Sequential(*layers)
        self.skip = torch.nn.Conv2d(45, 47, 1)
        self.head = torch.nn.Linear(47, 3)
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features[:9](x)
        y = self.features[9:](h) + self.skip(h)
        return self.head(y.mean((2, 3)))


def test_odd_channel_widths_match_torch(tmp_path):
    model = _OddWidths().eval()
    build_tvm(model, torch.randn(1, 1, 8, 8), HOST, tmp_path)  # raises if TVM and torch differ
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load_tvm(tmp_path).run(x), ref, atol=1e-4, rtol=0)
