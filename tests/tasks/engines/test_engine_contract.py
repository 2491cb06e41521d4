"""One contract, every registered engine (tasks/engines/__init__.py): build, load, outputs match PyTorch,
a corrupt artifact is refused, metadata round-trips. A new engine gets these tests by registering.

The RPC engine is served by a TVM RPC server of this machine's own architecture on a free loopback port
(the rpc_server fixture, tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compression_ops import OpData, QuantizeInt8, apply
from tasks.devices import Device, RPCConfig
from tasks.engines import ENGINES, builds, get_engine
from tasks.engines.base import BuildJob
from tasks.errors import ArtifactError, ConfigError, DeviceError
from tasks.models import create_model
from tasks.models.checkpoint import save_checkpoint

HOST = Device(name="host", target={"kind": "llvm", "mcpu": "native"})
FPGA = Device(name="fpga", target={"kind": "hls", "io_type": "io_parallel", "reuse_factor": 1})
TOLERANCE = {"float32": 1e-3, "int8": None, "fixed-point": None}  # int8/fixed: top-1 agreement instead


def _device(engine_name: str, request: pytest.FixtureRequest) -> Device:
    runs_on = get_engine(engine_name).runs_on
    if runs_on == "rpc":
        return Device(name="board", target=HOST.target, rpc=request.getfixturevalue("rpc_server"))
    return FPGA if runs_on == "fpga" else HOST


ARCH = {"name": "resnet8", "kwargs": {"width": 4}}


@pytest.fixture(scope="module")
def model_and_data(bn_stats):
    """A zoo ResNet-8 (so its checkpoint rebuilds) with non-trivial BN statistics, and 96 inputs."""
    torch.manual_seed(0)
    model = bn_stats(create_model(ARCH["name"], in_channels=1, num_classes=4, **ARCH["kwargs"]))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    return model, x


def _deployed(model, x):
    data = OpData(example=x[:1], batches=[(x[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 96, 32)])
    return apply(model, QuantizeInt8(calibration="minmax"), data).model.eval()


@pytest.fixture(scope="module", params=list(ENGINES))
def built(request, model_and_data, tmp_path_factory):
    """(engine, device, artifact, meta) for each registered engine, built once."""
    engine = get_engine(request.param)
    device = _device(engine.name, request)
    model, x = model_and_data
    root = tmp_path_factory.mktemp(engine.name)
    checkpoint = root / "source.pt"
    save_checkpoint(model, checkpoint, arch=ARCH, input_shape=[1, 8, 8], num_classes=4)
    job = BuildJob(model=model, example=x[:1], device=device, out=root / engine.artifact_path("compressed", device.name),
                   root=root, checkpoint=checkpoint, batch_sizes=(1, 4),
                   calibration=lambda: x.numpy(), deployed=lambda: _deployed(model, x))
    return engine, device, job.out, engine.build(job)


def _reference(engine, model, x):
    ref_model = _deployed(model, x) if engine.reference == "deployed" else model
    with torch.inference_mode():
        return ref_model(x).numpy()


def test_build_then_load_matches_pytorch(built, model_and_data):
    engine, device, artifact, _ = built
    model, x = model_and_data
    runner = engine.load(artifact, device, threads=1)
    try:
        got = np.concatenate([runner.run(x[i:i + 32].numpy()) for i in range(0, len(x), 32)])
    finally:
        getattr(runner, "close", lambda: None)()
    ref = _reference(engine, model, x)
    assert got.shape == ref.shape
    tol = TOLERANCE[engine.dtype]
    if tol is not None:
        assert np.abs(got - ref).max() < tol
    else:  # quantized arithmetic: the same decisions nearly everywhere
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_metadata_round_trips(built):
    engine, _, artifact, meta = built
    assert json.loads(json.dumps(engine.read_meta(artifact), default=list)) == json.loads(json.dumps(meta, default=list))
    assert isinstance(engine.describe(meta), str) and engine.describe(meta)


def test_corrupt_artifact_is_refused(built, tmp_path):
    import shutil

    engine, device, artifact, meta = built
    copy = tmp_path / artifact.name
    if artifact.is_dir():
        shutil.copytree(artifact, copy)
        lib = copy / str(meta["library"])
    else:
        shutil.copy2(artifact, copy)
        for side in artifact.parent.glob(artifact.stem + "*.meta.json"):  # the sidecar, kept intact
            shutil.copy2(side, tmp_path / side.name)
        lib = copy
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    lib.write_bytes(bytes(data))
    with pytest.raises((ArtifactError, DeviceError)):
        runner = engine.load(copy, device, threads=1)
        getattr(runner, "close", lambda: None)()


def test_missing_artifact_names_the_fix(built, tmp_path):
    engine, device, *_ = built
    with pytest.raises(ArtifactError, match=r"re-?run|rebuild|compile"):
        engine.load(tmp_path / "nothing-here", device, threads=1)


def test_every_engine_declares_what_it_serves():
    rpc_device = Device(name="board", target=HOST.target, rpc=RPCConfig(host="127.0.0.1"))
    for e in ENGINES.values():
        assert [e.serves(d) for d in (HOST, rpc_device, FPGA)].count(True) == 1, e.name
        for fn in ("build", "load", "read_meta", "describe"):
            assert callable(getattr(e.adapter, fn)), f"{e.name}'s adapter {e.module} lacks {fn}"
        if e.timing == "estimate":
            assert callable(e.adapter.estimate) and callable(e.adapter.estimate_line)
        if e.base_engine:
            assert e.base_engine in ENGINES


def test_builds_follow_targets_engines_and_plan():
    names = {(b.engine.name, b.model, b.target) for b in builds(None, [HOST, FPGA], HOST, int8_plan=True)}
    assert ("onnxruntime_int8", "compressed", "host") in names and ("onnxruntime_int8", "base", "host") not in names
    assert ("fpga_hls", "compressed", "fpga") in names and not any(n[0] == "tvm_rpc" for n in names)
    assert {("tvm", "base", "host"), ("pytorch", "base", "host")} <= names
    no_int8 = {b.engine.name for b in builds(None, [HOST], HOST, int8_plan=False)}
    assert "onnxruntime_int8" not in no_int8 and "fpga_hls" not in no_int8
    only = builds(["pytorch", "tvm"], [HOST], HOST, int8_plan=True)
    assert {b.engine.name for b in only} == {"pytorch", "tvm"}
    with pytest.raises(ConfigError, match="target 'fpga' has no engine.*add fpga_hls"):
        builds(["pytorch", "tvm"], [HOST, FPGA], HOST, int8_plan=True)
    with pytest.raises(ConfigError, match="unknown engine 'tensorrt'"):
        builds(["tensorrt"], [HOST], HOST, int8_plan=False)


def test_artifact_paths_keep_the_compile_layout():
    assert get_engine("tvm").artifact_path("base", "host") == "base/host"
    assert get_engine("onnxruntime_int8").artifact_path("compressed", "host") == "compressed/model.int8.onnx"
    assert Path(get_engine("pytorch").artifact_path("base", "host")).name == "model.pt"
