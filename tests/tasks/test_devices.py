from __future__ import annotations

from pathlib import Path

import pytest

from tasks.devices import get_device, load_devices
from tasks.errors import ConfigError

REGISTRY = Path(__file__).resolve().parents[2] / "infra" / "devices.yaml"


def test_shipped_registry_loads():
    devices = load_devices(REGISTRY)
    assert {"host", "aarch64_neon"} <= set(devices)
    host, arm = devices["host"], devices["aarch64_neon"]
    assert host.name == "host" and host.is_local and host.threads >= 1
    assert not arm.is_local and arm.rpc.port == 9190
    assert arm.cross_compiler == "aarch64-linux-gnu-gcc"
    assert arm.tvm_target() == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def test_native_mcpu_resolves_to_host_cpu():
    target = get_device("host", REGISTRY).tvm_target()
    assert target["kind"] == "llvm"
    assert target["mcpu"] and target["mcpu"] != "native"


def test_unknown_device_lists_known_names():
    with pytest.raises(ConfigError, match=r"unknown device 'tpu'.*aarch64_neon, fpga_zu7ev, host"):
        get_device("tpu", REGISTRY)


def test_env_var_and_validation(tmp_path, monkeypatch):
    p = tmp_path / "devices.yaml"
    p.write_text("devices:\n  box:\n    target: {kind: llvm}\n    threads: 1\n    gpu: true\n")
    monkeypatch.setenv("SHRINKFLOW_DEVICES", str(p))
    with pytest.raises(ConfigError, match="box.gpu"):
        load_devices()
    p.write_text("devices:\n  box:\n    target: {mcpu: native}\n")
    with pytest.raises(ConfigError, match="needs a 'kind'"):
        load_devices()
    p.write_text("devices:\n  box:\n    target: {kind: llvm}\n")
    assert get_device("box").threads == 1


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_devices(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_devices(bad)
