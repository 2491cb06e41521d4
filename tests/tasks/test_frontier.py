"""tasks/frontier.py without a DAG: the point runs' state, and collecting a frontier one of whose points failed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tasks.errors import ConfigError, StageError
from tasks.frontier import collect, point_group_id, point_label, point_run_id, start_point
from tasks.workspace import run_paths, write_json

PIPELINES = textwrap.dedent(
    """
    pipelines:
      fr:
        data: {source: synthetic}
        model: {name: resnet8}
        goal: {frontier: [2.5, 4], metric: macs}
    """
)


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pipelines.yaml").write_text(PIPELINES)
    monkeypatch.setenv("SHRINKFLOW_PIPELINES", str(tmp_path / "pipelines.yaml"))
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "ws"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_paths("fr", "R").update_state(pipeline="fr", run_id="R", overrides={"train": {"epochs": 3}}, force=True)
    return tmp_path / "ws"


def test_names() -> None:
    assert (point_label(2.0), point_label(2.5)) == ("2x", "2.5x")
    assert point_group_id(2.5) == "point_2_5x" and point_run_id("R", 4.0) == "R--4x"


def test_a_point_run_inherits_the_overrides_with_its_own_speedup(ws: Path) -> None:
    rid = start_point("fr", "R", 2.5)
    state = run_paths("fr", rid).read_state()
    assert rid == "R--2.5x" and state["frontier"] == {"of": "R", "point": 2.5, "label": "2.5x"}
    assert state["overrides"] == {"train": {"epochs": 3}, "goal": {"speedup": 2.5, "frontier": None}}
    assert state["force"] == "search"  # the point reuses R's data and base even when R recomputes them
    with pytest.raises(ConfigError, match="3x is not a point"):
        start_point("fr", "R", 3.0)


def test_a_failed_point_is_reported_and_the_others_collected(ws: Path) -> None:
    write_json(run_paths("fr", "R").stage_dir("train_base") / "metrics.json",
               {"test_accuracy": 90.0, "macs": 1000, "params": 100})
    done = run_paths("fr", start_point("fr", "R", 2.5))
    start_point("fr", "R", 4.0)  # started, then its chain failed: no fine-tuned model
    write_json(done.stage_dir("finetune") / "metrics.json",
               {"test_accuracy": 89.0, "macs": 400, "params": 40, "goal_met": True})
    write_json(done.stage_dir("register") / "decision.json",
               {"model": "shrinkflow-fr-2.5x", "version": "1", "alias": "champion", "promoted": True})
    rows = [{"model": m, "engine": e, "target": "host", "batch": 1, "median_ms": ms}
            for m, e, ms in (("base", "pytorch", 1.0), ("base", "onnxruntime", 0.8),
                             ("compressed", "pytorch", 0.6), ("compressed", "tvm", 0.4))]
    write_json(done.stage_dir("benchmark") / "latency.json", {"rows": rows})

    with pytest.raises(StageError, match=r"1 of 2 points; missing: 4x: .*point_4x"):
        collect("fr", "R")
    doc = json.loads((ws / "runs" / "fr" / "R" / "frontier" / "frontier.json").read_text())
    (point,) = doc["points"]
    assert point["macs_reduction"] == 2.5 and point["accuracy_drop"] == pytest.approx(1.0)
    assert point["latency"]["host"] == {"engine": "tvm", "median_ms": 0.4, "emulated": None, "batch": 1,
                                        "speedup": pytest.approx(2.0)}  # against the base's fastest, 0.8 ms
    assert list(doc["missing"]) == ["4x"]
    assert "**missing**" in (ws / "runs" / "fr" / "R" / "frontier" / "report.md").read_text()
