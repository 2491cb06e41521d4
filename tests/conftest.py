"""Shared fixtures: a tiny pipelines file and an isolated workspace per test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_PIPELINES = textwrap.dedent(
    """
    pipelines:
      synth:
        data: {source: synthetic, num_samples: 400, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 8}}
        train: {epochs: 4, batch_size: 32, lr: 0.05}
        goal: {speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}
        finetune: {epochs: 1, batch_size: 32, lr: 0.01}
        benchmark: {batch_sizes: [1, 4], warmup: 1, repeat: 3, threads: 1}
    """
)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ws = tmp_path / "ws"
    monkeypatch.setenv("SHRINKFLOW_HOME", str(ws))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return ws


@pytest.fixture
def pipelines_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(TINY_PIPELINES)
    monkeypatch.setenv("SHRINKFLOW_PIPELINES", str(p))
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Until something listens on 127.0.0.1:port; the test fails if `proc` exits or time runs out."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} did not start within {timeout:.0f} s")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def rpc_server():
    """A TVM RPC server of this machine's own architecture on a free loopback port (an RPC device that
    needs no emulator); its RPCConfig. Stopped after the module."""
    from tasks.devices import RPCConfig

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, "the TVM RPC server")
        yield RPCConfig(host="127.0.0.1", port=port, timeout_s=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server (a real S3 HTTP API) on a free loopback port, with test credentials; its URL."""
    port = _free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, "moto's S3 server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server, with the environment pointing boto3/s3fs at it; its name."""
    import uuid

    import boto3

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
