from __future__ import annotations

import os

import pytest
import torch

from tasks.engines import get_engine
from tasks.engines.timing import set_threads, thread_env, time_interleaved
from tasks.errors import ConfigError


def test_every_name_gets_positive_stats():
    calls: dict[str, int] = {"a": 0, "b": 0, "c": 0}

    def make(name: str):
        def fn() -> int:
            calls[name] += 1
            return sum(range(200))

        return fn

    res = time_interleaved({n: make(n) for n in calls}, warmup=2, repeat=7)
    assert set(res) == {"a", "b", "c"}
    for stats in res.values():
        assert set(stats) == {"median_ms", "p90_ms", "mean_ms", "min_ms", "n"}
        assert stats["n"] == 7
        assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
        assert stats["mean_ms"] > 0
    assert calls == {"a": 9, "b": 9, "c": 9}


def test_rounds_rotate_the_order():
    order: list[str] = []
    time_interleaved({n: (lambda n=n: order.append(n)) for n in "xyz"}, warmup=0, repeat=3)
    assert order == ["x", "y", "z", "y", "z", "x", "z", "x", "y"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        time_interleaved({})
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, repeat=0)


def test_set_threads_pins_and_restores(monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with set_threads(1):
        assert torch.get_num_threads() == 1
        assert os.environ["TVM_NUM_THREADS"] == "1"
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert torch.get_num_threads() == before
    assert "TVM_NUM_THREADS" not in os.environ
    assert thread_env(3)["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError):
        with set_threads(0):
            pass


def test_engine_registry_is_light_and_names_what_it_knows():
    """Importing the registry loads no engine (no torch, TVM or ONNX Runtime); an unknown name lists the known."""
    import subprocess
    import sys

    code = ("import sys, tasks.engines as e; assert len(e.ENGINES) == 6, e.ENGINES; "
            "print(sorted(m for m in ('torch', 'tvm', 'onnxruntime', 'hls4ml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    assert get_engine("onnxruntime").adapter.load.__module__ == "tasks.engines.onnx_runtime"
    with pytest.raises(ConfigError, match="unknown engine 'tensorrt'.*pytorch, onnxruntime, tvm, tvm_rpc"):
        get_engine("tensorrt")
