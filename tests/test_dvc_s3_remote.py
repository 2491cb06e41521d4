"""DVC with an S3 remote (the scale-out deployments' object store; here moto's S3 server): `dvc push`
uploads what `dvc add` tracked, and a fresh checkout gets it back with `dvc pull`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DVC = Path(sys.executable).with_name("dvc")
REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_the_repo_declares_the_cluster_remote_on_the_object_store():
    config = (REPO / ".dvc" / "config").read_text()
    assert "['remote \"cluster\"']" in config and "url = s3://shrinkflow-artifacts/dvc" in config
    env = (REPO / "infra" / "cluster.env").read_text()
    assert "SHRINKFLOW_ARTIFACTS=s3://shrinkflow-artifacts/" in env  # the same bucket as the workspace


@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")
def test_dvc_push_and_pull_against_an_s3_remote(tmp_path, s3_bucket):
    work = tmp_path / "work"
    work.mkdir()
    _run(["git", "init", "-q"], work)
    _run([str(DVC), "init", "-q"], work)
    _run([str(DVC), "remote", "add", "-d", "cluster", f"s3://{s3_bucket}/dvc"], work)
    model = work / "model.pt"
    model.write_bytes(os.urandom(100_000))
    _run([str(DVC), "add", "-q", "model.pt"], work)
    _run([str(DVC), "push", "-q"], work)

    # A fresh checkout: the .dvc files and config, no cache, no data.
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(work / ".dvc", clone / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copy(work / "model.pt.dvc", clone / "model.pt.dvc")
    _run(["git", "init", "-q"], clone)
    _run([str(DVC), "pull", "-q"], clone)
    assert (clone / "model.pt").read_bytes() == model.read_bytes()
