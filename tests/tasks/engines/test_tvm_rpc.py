"""TVM RPC: bounded connects with retries, and a real run on the emulated ARM device.

The device tests set up and start infra/arm's emulated aarch64 device (qemu-user running an aarch64
Python with the aarch64 TVM wheel as a TVM RPC server) on a free port, cross-compile a small CNN
with aarch64-linux-gnu-gcc and run it there through tvm.rpc, as on a board. They are skipped only
where qemu-aarch64 cannot be installed or run. The first setup downloads ~130 MB (cached after).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tasks.devices import RPCConfig, get_device
from tasks.engines.tvm_build import build_tvm
from tasks.engines.tvm_rpc import RemoteTVMRunner, connect, detect_emulated
from tasks.errors import ArtifactError, DeviceError

REPO = Path(__file__).resolve().parents[3]
SETUP = REPO / "infra/arm/setup_device.sh"
RPC_DEVICE = REPO / "infra/arm/rpc_device.sh"
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- unreachable devices: a clear error, retries, no hang ---------------------------------------


def test_closed_port_fails_fast_after_retries(caplog):
    port = _free_port()  # bound and released: nothing listens there now
    rpc = RPCConfig(host="127.0.0.1", port=port, timeout_s=2)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tasks.engines.tvm_rpc"):
        with pytest.raises(DeviceError) as err:
            connect(rpc, retries=2, backoff_s=0.05)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "3 tries failed" in msg and "2s timeout each" in msg
    assert "make arm-device" in msg and "infra/devices.yaml" in msg
    retried = [r for r in caplog.records if "failed" in r.getMessage() and "retrying" in r.getMessage()]
    assert len(retried) == 2


def test_silent_port_times_out_instead_of_hanging():
    # Listens but never accepts: what a busy TVM RPC server (one session at a time) looks like.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=rf"127\.0\.0\.1:{port}.*2 tries failed.*nothing answered"):
            connect(RPCConfig(host="127.0.0.1", port=port, timeout_s=0.5), retries=1, backoff_s=0.05)
        assert time.monotonic() - t0 < 4


def test_unreachable_tracker_names_the_tracker_and_key():
    port = _free_port()
    rpc = RPCConfig(host="127.0.0.1", port=port, key="rk3588", timeout_s=1)
    with pytest.raises(DeviceError, match=rf"tracker 127\.0\.0\.1:{port} \(key 'rk3588'\).*1 tries"):
        connect(rpc, retries=0)


# --- the emulated aarch64 device ----------------------------------------------------------------


def _why_no_qemu() -> str | None:
    """Why the emulated device cannot run here, or None when setup_device.sh can make it run."""
    if sys.platform != "linux":
        return f"qemu-user emulation needs Linux, this is {sys.platform}"
    have = (
        os.access("/usr/bin/qemu-aarch64", os.X_OK)
        and shutil.which("aarch64-linux-gnu-gcc")
        and os.path.isfile("/usr/aarch64-linux-gnu/lib/crti.o")
    )
    if have:
        return None
    if os.geteuid() != 0:
        return (
            "qemu-aarch64 or the aarch64 cross gcc is missing and only root can install them: run "
            "`sudo apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross`"
        )
    if not shutil.which("apt-get"):
        return "qemu-aarch64 is missing and there is no apt-get to install it (Debian/Ubuntu only)"
    return None


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def arm_setup() -> None:
    """infra/arm/setup_device.sh has run: qemu, the cross gcc and the aarch64 sysroot (cached)."""
    reason = _why_no_qemu()
    if reason:
        pytest.skip(f"no emulated ARM device: {reason}")
    setup = _run(["bash", str(SETUP)], timeout=1200)
    assert setup.returncode == 0, f"setup_device.sh failed:\n{setup.stdout}\n{setup.stderr}"


@pytest.fixture(scope="module")
def arm_device(arm_setup) -> RPCConfig:
    """The emulated device started on a free port; stopped afterwards."""
    port = _free_port()
    start = _run(["bash", str(RPC_DEVICE), "start", str(port)], timeout=400)
    try:
        assert start.returncode == 0, f"rpc_device.sh start failed:\n{start.stdout}\n{start.stderr}"
        yield RPCConfig(host="127.0.0.1", port=port, timeout_s=30)
    finally:
        _run(["bash", str(RPC_DEVICE), "stop", str(port)], timeout=60)
    cache = Path(os.environ.get("SHRINKFLOW_CACHE") or Path.home() / ".cache/shrinkflow")
    (cache / f"devices/aarch64/rpc-{port}.log").unlink(missing_ok=True)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def cnn(bn_stats) -> nn.Module:
    torch.manual_seed(0)
    return bn_stats(SmallCNN())


@pytest.fixture(scope="module")
def aarch64_build(arm_setup, cnn, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tvm_aarch64")
    example = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    meta = build_tvm(cnn, example, AARCH64, out, cross_compiler="aarch64-linux-gnu-gcc")
    assert meta["target"]["mtriple"] == "aarch64-linux-gnu" and not meta["verified_on_host"]
    return out


@pytest.fixture(scope="module")
def remote(arm_device, aarch64_build) -> RemoteTVMRunner:
    # The registry's ARM device, pointed at this test's port: the path a pipeline takes.
    device = get_device("aarch64_neon", REPO / "infra/devices.yaml")
    device = device.model_copy(update={"rpc": arm_device})
    with RemoteTVMRunner.for_device(aarch64_build, device, retries=2, backoff_s=0.5) as runner:
        yield runner


class NoUpload:
    """A session that fails the test if the runner sends it anything."""

    def __getattr__(self, name):
        raise AssertionError(f"the runner called session.{name} for an artifact it should have refused")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_outputs_on_the_device_match_torch(remote, cnn, batch):
    x = np.random.default_rng(batch).standard_normal((batch, 1, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        ref = cnn(torch.from_numpy(x)).numpy()
    got = remote.run(x)
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert remote.input_shape == (None, 1, 16, 16)


@pytest.mark.slow
def test_time_runs_on_the_device_and_says_emulated(remote, arm_device):
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
    stats = remote.time(x, number=5, repeat=5, warmup=2)
    assert stats["n"] == 5 and stats["batch"] == 1
    for key in ("median_ms", "p90_ms", "mean_ms", "min_ms"):
        assert stats[key] > 0, stats
    assert stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert detect_emulated(arm_device) is True
    assert stats["emulated"] is True and "emulated" in stats["note"]
    print(f"\nemulated aarch64 latency, batch 1: {stats['median_ms']:.3f} ms median (qemu, not ARM speed)")


@pytest.mark.slow
def test_busy_device_is_a_timeout_not_a_hang(remote, arm_device):
    # The server serves one session at a time and `remote` holds it: a second client must give up.
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=r"busy with another session"):
        connect(arm_device, retries=0, timeout_s=1)
    assert time.monotonic() - t0 < 5


@pytest.mark.slow
def test_close_frees_the_device_for_the_next_client(remote, arm_device, aarch64_build, cnn):
    # Runs after the other tests on `remote` (file order): it ends that session.
    remote.close()
    with pytest.raises(DeviceError, match="closed"):
        remote.run(np.zeros((1, 1, 16, 16), np.float32))
    x = np.random.default_rng(2).standard_normal((2, 1, 16, 16)).astype(np.float32)
    # The one-session server ends the old session's worker first: under qemu on a loaded machine
    # that took more than 3 x 30 s once (full suite beside `make demo`), so allow for it.
    with RemoteTVMRunner(aarch64_build, connect(arm_device, retries=4, backoff_s=5.0), AARCH64) as again:
        got = again.run(x)
    with torch.inference_mode():
        np.testing.assert_allclose(got, cnn(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_corrupt_library_is_refused_before_upload(aarch64_build, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(aarch64_build, out)
    lib = out / "model.so"
    data = bytearray(lib.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        RemoteTVMRunner(out, NoUpload(), AARCH64)


@pytest.mark.slow
def test_library_for_another_arch_is_refused_before_upload(aarch64_build, tmp_path):
    out = tmp_path / "x86"
    shutil.copytree(aarch64_build, out)
    meta = json.loads((out / "meta.json").read_text())
    meta["target"] = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"built for x86_64 .* is aarch64"):
        RemoteTVMRunner(out, NoUpload(), AARCH64, name="the ARM board")
