"""Hardware in the loop: latency the benchmark measured on a device is what the search uses next."""

from __future__ import annotations

import copy

import pytest
import torch

from compression_ops.base import OpData
from compression_ops.channel_prune import ChannelPrune, channel_prune
from tasks.latency.best import best_engines, latency_table, pairs
from tasks.latency.feedback import feed_back
from tasks.latency.rows import Check, Latency
from tasks.search.trial import LatencyCache


@pytest.fixture(scope="module")
def pair():
    from tasks.models import create_model

    torch.manual_seed(0)
    base = create_model("resnet8", in_channels=1, num_classes=4, width=8).eval()
    ex = torch.randn(2, 1, 8, 8)
    small = channel_prune(copy.deepcopy(base), ChannelPrune(ratio=0.5), OpData(example=ex)).model.eval()
    return base, small, ex


def test_benchmarked_ratio_wins_over_a_measurement(pair, tmp_path, monkeypatch):
    base, small, ex = pair
    path = tmp_path / "latency-host.json"
    cache = LatencyCache(path, "host")
    cache.record(base, small, "onnxruntime", 2.0, 0.5)
    cache.record(base, small, "tvm", 1.0, 0.8)

    def no_measure(*a, **k):
        raise AssertionError("a benchmarked architecture must not be measured again")

    monkeypatch.setattr("tasks.search.trial.latency_reduction", no_measure)
    got = LatencyCache(path, "host").measure(base, small, ex[:1])  # a new process reads the file
    # the fastest engine for the candidate is the one deployment picks: onnxruntime, 0.5 ms, 4x
    assert got["latency_reduction"] == pytest.approx(4.0) and got["latency_ms"] == pytest.approx(0.5)
    assert got["latency_on_device"] == 1.0 and got["latency_cached"] == 1.0
    # another device's figures are not used for this one
    assert not any(k.startswith("aarch64_neon:") for k in cache.data)


def test_unknown_architecture_is_measured_once_then_cached(pair, tmp_path, monkeypatch):
    base, small, ex = pair
    calls = []

    def fake(b, m, x, repeat, warmup):
        calls.append(1)
        return 1.5, 3.0, 2.0

    monkeypatch.setattr("tasks.search.trial.latency_reduction", fake)
    cache = LatencyCache(tmp_path / "latency-host.json", "host")
    first = cache.measure(base, small, ex[:1])
    second = LatencyCache(tmp_path / "latency-host.json", "host").measure(base, small, ex[:1])
    assert calls == [1]
    assert first["latency_cached"] == 0.0 and second["latency_cached"] == 1.0
    assert second["latency_reduction"] == 1.5 and second["latency_on_device"] == 0.0


def test_unreachable_device_in_the_loop_says_how_to_start_it(pair, tmp_path, monkeypatch):
    """A search whose goal names an RPC device that is down fails with the device's error, not a hang."""
    import socket

    from tasks.errors import DeviceError

    base, small, ex = pair
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "devices:\n  board:\n    target: {kind: llvm, mtriple: aarch64-linux-gnu, mattr: ['+neon']}\n"
        f"    cross_compiler: aarch64-linux-gnu-gcc\n    rpc: {{host: 127.0.0.1, port: {port}, timeout_s: 2}}\n"
    )
    monkeypatch.setenv("SHRINKFLOW_DEVICES", str(devices))
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (infra/arm/setup_device.sh installs it)")
    with pytest.raises(DeviceError, match=f"127.0.0.1:{port}.*make arm-device"):
        LatencyCache(tmp_path / "latency-board.json", "board").measure(base, small, ex[:1])


def _rows() -> list[Latency]:
    rows = [("base", "pytorch", "host", 1, 3.0), ("compressed", "pytorch", "host", 1, 2.5),
            ("base", "tvm", "host", 1, 0.9), ("compressed", "tvm", "host", 1, 0.4),
            ("base", "onnxruntime", "host", 1, 0.6), ("compressed", "onnxruntime", "host", 1, 0.5),
            ("compressed", "onnxruntime_int8", "host", 1, 0.3),
            ("base", "tvm_rpc", "arm", 1, 9.0), ("compressed", "tvm_rpc", "arm", 1, 5.0)]
    return [Latency(m, e, t, b, ms, ms * 1.1, ms, ms * 0.9, emulated=t == "arm", artifact_bytes=2000)
            for m, e, t, b, ms in rows]


def test_best_engine_per_target_and_table():
    rows = _rows()
    best = best_engines(rows, [1])
    assert best == {"arm": {"1": {"engine": "tvm_rpc", "median_ms": 5.0}},
                    "host": {"1": {"engine": "onnxruntime_int8", "median_ms": 0.3}}}
    checks = [Check("compressed", "tvm_rpc", "arm", 100, 91.0, 2e-6, 1.0)]
    table = latency_table(rows, checks)
    lines = table.splitlines()
    assert "b1 median ms" in lines[0] and "b1 p90 ms" in lines[0] and "artifact kB" in lines[0]
    arm = [ln for ln in lines if "arm (emulated)" in ln and ln.startswith("compressed")]
    assert len(arm) == 1 and "100.00%" in arm[0] and "5.000" in arm[0] and "2.0" in arm[0]
    # host rows come first, every (model, target, engine) once
    assert len(lines) == 2 + 9 and "host" in lines[2]


def test_pairs_compare_int8_with_the_fp32_base_of_its_registry_entry():
    by = {(p.engine, p.target): p for p in pairs(_rows())}
    assert set(by) == {("pytorch", "host"), ("tvm", "host"), ("onnxruntime", "host"), ("onnxruntime_int8", "host"),
                       ("tvm_rpc", "arm")}
    assert by[("onnxruntime_int8", "host")].base_ms == 0.6 and by[("onnxruntime_int8", "host")].speedup == 2.0
    assert by[("tvm_rpc", "arm")].emulated is True and by[("tvm_rpc", "arm")].speedup == 9.0 / 5.0


def test_feed_back_records_each_engines_ratio_for_the_search(pair, tmp_path):
    base, small, _ = pair
    assert feed_back(tmp_path, _rows(), {"base": base, "compressed": small}) == 5
    # the search reads it back without measuring: the device's figure, benchmarked
    got = LatencyCache(tmp_path / "latency-arm.json", "arm").measure(base, small, torch.zeros(1, 1, 8, 8))
    assert got["latency_reduction"] == pytest.approx(9.0 / 5.0) and got["latency_on_device"] == 1.0
    host = LatencyCache(tmp_path / "latency-host.json", "host").measure(base, small, torch.zeros(1, 1, 8, 8))
    assert host["latency_ms"] == pytest.approx(0.3)  # the fastest engine there: int8 vs its fp32 base, 2x
    assert host["latency_reduction"] == pytest.approx(2.0)
