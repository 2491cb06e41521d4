"""goal.frontier: one model per point from one run, through the real DAG (`shrinkflow run`, dag.test on SQLite).

The run trains the base once; each point runs the chain as its own point run (data and base reused),
registers its own model with its measured latency, and the frontier is collected into a JSON, a plot
and a report logged to MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dag_helpers import dagbag, use_pipelines

from tasks.config import load_pipelines
from tasks.errors import ConfigError
from tasks.run_params import parse_conf
from tasks.stage_specs import STAGES

REPO = Path(__file__).resolve().parents[2]
PIPELINES = textwrap.dedent(
    """
    pipelines:
      synth_frontier:
        data: {source: synthetic, num_samples: 400, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 8}}
        train: {epochs: 4, batch_size: 32, lr: 0.05}
        goal: {frontier: [2.0, 1.3], metric: macs, max_accuracy_drop: 50.0}
        finetune: {epochs: 1, batch_size: 32, lr: 0.01}
        compile: {tuning: {budget_s: 0}}
        benchmark: {batch_sizes: [1], warmup: 1, repeat: 3, threads: 1}
    """
)


def _pipelines(tmp_path: Path, text: str = PIPELINES) -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(text)
    return p


def test_frontier_points_are_validated(tmp_path: Path) -> None:
    cfg = load_pipelines(_pipelines(tmp_path))["synth_frontier"]
    assert cfg.goal.frontier == [1.3, 2.0] and cfg.goal.speedup is None  # sorted
    both = PIPELINES.replace("goal: {frontier", "goal: {speedup: 2.0, frontier")
    with pytest.raises(ConfigError, match="goal.speedup .* or goal.frontier .* not both"):
        load_pipelines(_pipelines(tmp_path, both))
    with pytest.raises(ConfigError, match="repeat a value"):
        load_pipelines(_pipelines(tmp_path, PIPELINES.replace("[2.0, 1.3]", "[2.0, 2.0]")))
    with pytest.raises(ConfigError, match="frontier"):
        load_pipelines(_pipelines(tmp_path, PIPELINES.replace("[2.0, 1.3]", "[2.0, 0.5]")))


def test_a_trigger_cannot_change_the_frontier(tmp_path: Path) -> None:
    cfg = load_pipelines(_pipelines(tmp_path))["synth_frontier"]
    with pytest.raises(ConfigError, match="goal.frontier cannot be changed for one run"):
        parse_conf({"overrides": {"goal.frontier": [2, 4]}}, cfg, STAGES)
    with pytest.raises(ConfigError, match="not both"):  # a single speedup on a frontier pipeline
        parse_conf({"speedup": 3.0}, cfg, STAGES)


def test_frontier_dag_has_a_group_per_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_pipelines(PIPELINES, tmp_path, monkeypatch)
    bag = dagbag(tmp_path)
    assert bag.import_errors == {}
    dag = bag.dags["shrinkflow__synth_frontier"]
    for group in ("point_1_3x", "point_2x"):
        start = dag.get_task(f"{group}.start_point")
        assert start.upstream_task_ids == {"start", "train_base"}  # the run id, and after the base
        assert dag.get_task(f"{group}.prepare_data").upstream_task_ids == {f"{group}.start_point"}
        assert dag.get_task(f"{group}.register").downstream_task_ids == {"frontier"}
    assert "search" not in dag.task_ids  # the frontier run itself stops at the base
    assert dag.get_task("frontier").upstream_task_ids == {"start", "point_1_3x.register", "point_2x.register"}


@pytest.mark.slow
def test_frontier_run_registers_one_model_per_point(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "SHRINKFLOW"))}
    env["SHRINKFLOW_PIPELINES"] = str(_pipelines(tmp_path))
    cmd = [str(Path(sys.executable).parent / "shrinkflow"), "--workspace", str(ws), "run", "synth_frontier",
           "--run-id", "fr"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"shrinkflow run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    runs = ws / "runs" / "synth_frontier"
    doc = json.loads((runs / "fr" / "frontier" / "frontier.json").read_text())
    assert [p["label"] for p in doc["points"]] == ["1.3x", "2x"]
    for p in doc["points"]:
        assert p["macs_reduction"] >= p["point"] * 0.97, p  # each point met its own MACs goal
        assert p["latency"]["host"]["median_ms"] > 0 and p["latency"]["host"]["batch"] == 1
        assert p["registered"]["model"] == f"shrinkflow-synth_frontier-{p['label']}"
        state = json.loads((runs / p["run_id"] / "run.json").read_text())
        assert state["overrides"]["goal"]["speedup"] == p["point"]
        assert state["stages"]["train_base"]["reused"] is True  # the base was trained once
        assert state["stages"]["register"]["reused"] is False
    assert doc["points"][1]["macs"] < doc["points"][0]["macs"]
    assert (runs / "fr" / "frontier" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    report = (runs / "fr" / "frontier" / "report.md").read_text()
    assert "shrinkflow-synth_frontier-2x" in report and "frontier.png" in report
    assert "frontier: 2 points" in proc.stdout

    from mlflow.tracking import MlflowClient

    from tasks.tracking import workspace_tracking_uri

    uri = workspace_tracking_uri(ws)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for p in doc["points"]:
        name = p["registered"]["model"]
        (mv,) = client.search_model_versions(f"name = '{name}'")
        assert mv.tags["frontier_point"] == p["label"] and "latency_ms.host.b1" in mv.tags
        assert client.get_model_version_by_alias(name, "champion").version == mv.version
    (parent,) = client.search_runs(
        [r.experiment_id for r in client.search_experiments()],
        filter_string="tags.`shrinkflow.frontier` = '1.3x,2x'")
    assert parent.data.metrics["frontier.2x.macs_reduction"] >= 1.94
    assert "frontier.1.3x.latency_ms.host" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "frontier")} >= {
        "frontier/frontier.json", "frontier/frontier.png", "frontier/report.md"}
