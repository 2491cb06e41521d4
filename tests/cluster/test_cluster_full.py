"""`make cluster-test`: pipelines.yaml's digits_tiny on the cluster `infra/local-cluster.sh up` started
(search.workers 2 from $SHRINKFLOW_SEARCH_WORKERS), against the same pipeline run embedded (SQLite,
local folders, dag.test) in a fresh workspace.

The cluster run must spread over both workers with overlapping trials, publish every stage whole with
its lineage, and end as the embedded run does: the same stages, the same artifacts (file for file; the
prepared data byte for byte), and the same registry outcome (one new version; on a fresh cluster the
same champion decision).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from checks import check_published, check_spread, check_trials, registry_versions
from client import ClusterApi

from tasks.stage_specs import STAGES

pytestmark = pytest.mark.cluster

DAG_ID = "shrinkflow__digits_tiny"
REPO = Path(__file__).resolve().parents[2]


def _embedded_run(ws: Path, pipelines: str) -> dict:
    """`shrinkflow run digits_tiny` on the embedded default, in a process of its own (no cluster settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "SHRINKFLOW_", "AWS_"))}
    env.update(SHRINKFLOW_HOME=str(ws), SHRINKFLOW_PIPELINES=pipelines)
    proc = subprocess.run([str(Path(sys.executable).with_name("shrinkflow")), "run", "digits_tiny", "--run-id", "emb"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"the embedded run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((ws / "runs" / "digits_tiny" / "emb" / "run.json").read_text())


def _names(run: dict, stage: str) -> list[str]:
    """The stage's file names; hls4ml stamps its firmware library's name (shrinkflow_fpga-<8 hex>.so)."""
    return sorted(re.sub(r"-[0-9a-f]{8}\.so$", "-<stamp>.so", f) for f in run["stages"][stage]["outputs"]["files"])


def test_digits_tiny_on_two_workers_ends_as_the_embedded_run(dev_cluster, use_cluster_env, tmp_path):
    from tasks import object_store

    embedded = _embedded_run(tmp_path / "embedded", dev_cluster["pipelines"])
    env = use_cluster_env(dev_cluster)
    before = registry_versions(env["MLFLOW_TRACKING_URI"], "digits_tiny")
    api = ClusterApi(dev_cluster)
    api.wait_for_dag(DAG_ID)
    run_id = f"ct-{uuid.uuid4().hex[:8]}"
    api.trigger(DAG_ID, run_id, {"run_id": run_id})
    state = api.wait(DAG_ID, run_id, timeout=1500)
    assert state == "success", f"{api.task_states(DAG_ID, run_id)}\n{api.failed_logs(DAG_ID, run_id)}"

    check_spread(api, DAG_ID, run_id, dev_cluster["workers"])
    from tasks.config import load_pipeline

    n_trials = load_pipeline("digits_tiny", dev_cluster["pipelines"]).search.n_trials
    check_trials(env["SHRINKFLOW_OPTUNA_STORAGE"], f"digits_tiny:{run_id}", n_trials)
    run = check_published(object_store.ObjectStore(env["SHRINKFLOW_ARTIFACTS"]), "digits_tiny", run_id)

    # The same stages and artifacts as the embedded run.
    assert run["completed"] == embedded["completed"] == list(STAGES)
    for stage in STAGES:
        assert _names(run, stage) == _names(embedded, stage), stage
    assert run["stages"]["prepare_data"]["outputs"]["digest"] == embedded["stages"]["prepare_data"]["outputs"]["digest"]

    # The same registry outcome: exactly one new version, from this run.
    after = registry_versions(env["MLFLOW_TRACKING_URI"], "digits_tiny")
    new = [v for v in after if v.version not in {b.version for b in before}]
    assert len(new) == 1, [(v.version, v.run_id) for v in after]
    assert str(run["stages"]["register"]["version"]) == new[0].version
    if not before:  # a fresh cluster's registry starts where the embedded workspace's does
        for key in ("promoted", "alias", "reason"):
            assert run["stages"]["register"].get(key) == embedded["stages"]["register"].get(key), key
