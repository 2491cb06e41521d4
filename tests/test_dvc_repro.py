"""`.venv/bin/dvc repro` as the README gives it, on a fresh copy of the repo, with no activated venv:
a clean PATH (the system's python3 has no torch), no VIRTUAL_ENV, no PYTHONPATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def _copy_worktree(dest: Path) -> None:
    """The repo's tracked and new (not ignored) files, as a fresh clone of this tree would have them."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / "bin" / "dvc").exists(), reason="dvc is not installed in this environment")
def test_dvc_repro_without_an_activated_venv(tmp_path):
    clone = tmp_path / "clone"
    _copy_worktree(clone)
    (clone / ".venv").symlink_to(VENV)  # `make install` made it; here the test's own venv stands in
    # Few epochs: the point is which Python runs the stages, not the model.
    pipelines = yaml.safe_load((clone / "pipelines.yaml").read_text())
    pipelines["pipelines"]["digits_tiny"]["train"]["epochs"] = 1
    (clone / "pipelines.yaml").write_text(yaml.safe_dump(pipelines, sort_keys=False))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh clone"]):
        subprocess.run(git + cmd, cwd=clone, env=env, check=True, capture_output=True)
    # The README's command: .venv/bin/dvc repro (here only the first two stages, to stay short).
    proc = subprocess.run([".venv/bin/dvc", "repro", "train_base"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = clone / ".shrinkflow" / "runs" / "digits_tiny" / "dvc"
    assert json.loads((run / "prepare_data" / "dataset.json").read_text())["input_shape"] == [1, 8, 8]
    assert (run / "train_base" / "model.pt").is_file()
    assert json.loads((run / "train_base" / "metrics.json").read_text())["epochs"] == 1
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare_data", "train_base"}
    assert "stage.sh train_base" in lock["stages"]["train_base"]["cmd"]
