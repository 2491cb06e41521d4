"""SHRINKFLOW_HOME on a volume many workers share (NFS, a ReadWriteMany PVC), as it is: two processes
running stages of several runs at once, and a run's stages on different workers, leave every folder
whole (matching run.json) and no scratch behind. Tracking goes to a PostgreSQL MLflow store,
as a cluster's would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.fingerprint import manifest

REPO = Path(__file__).resolve().parents[2]
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/shrinkflow_test_shared"
PIPELINE = textwrap.dedent(
    """
    pipelines:
      tiny:
        data: {source: synthetic, num_samples: 300, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 8}}
        train: {epochs: 1, batch_size: 32, lr: 0.05}
        compression: {sensitivity: {enabled: false}}
    """
)

pytestmark = pytest.mark.postgres


def _database() -> None:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres", connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'shrinkflow_test_shared' "
                    "AND pid <> pg_backend_pid()")
        cur.execute("DROP DATABASE IF EXISTS shrinkflow_test_shared")
        cur.execute("CREATE DATABASE shrinkflow_test_shared")
    conn.close()


WORKER = textwrap.dedent(
    """
    import sys
    from tasks.stage_runner import run_stage
    cfg, ws, plan = sys.argv[1], sys.argv[2], sys.argv[3:]
    for item in plan:
        run_id, stage = item.split(":")
        run_stage(stage, "tiny", run_id, config_path=cfg, workspace=ws, force=True)
    """
)


def test_two_workers_on_one_shared_workspace(tmp_path):
    _database()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(PIPELINE)
    ws = tmp_path / "shared"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHRINKFLOW_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=PG, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # One worker sets run r0 up; then two workers at once run other runs' stages and, one after the other,
    # r0's next stage on the other worker (as Airflow spreads a run's tasks; it never runs one task twice
    # at once). They share the content-addressed data set, the incremental index and the MLflow store.
    first = subprocess.run([sys.executable, "-c", WORKER, str(cfg), str(ws), "r0:prepare_data"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    plans = [["r1:prepare_data", "r1:train_base", "r3:prepare_data", "r0:train_base"],
             ["r2:prepare_data", "r2:train_base", "r4:prepare_data", "r4:train_base"]]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(cfg), str(ws), *p], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in plans]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    both = ("prepare_data", "train_base")
    for run_id, stages in (("r0", both), ("r1", both), ("r2", both), ("r3", ("prepare_data",)), ("r4", both)):
        run_dir = ws / "runs" / "tiny" / run_id
        state = json.loads((run_dir / "run.json").read_text())
        for stage in stages:
            folder = run_dir / stage
            assert manifest(folder)["digest"] == state["stages"][stage]["outputs"]["digest"], (run_id, stage)
        leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
        assert not leftovers, f"{run_id}: scratch left behind: {leftovers}"
