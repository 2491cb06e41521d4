"""The DAG file: one DAG per pipeline, the stages in order, cheap to parse, loud when the config is bad."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from dag_helpers import dagbag, use_pipelines

from tasks.errors import UnknownPipelineError
from tasks.orchestrate import (
    DAG_FILE,
    DAGS_FOLDER,
    PipelineRunError,
    airflow_env,
    embedded_airflow,
    run_pipeline,
)
from tasks.stage_specs import STAGES  # noqa: E402

PIPELINES = textwrap.dedent(
    """
    pipelines:
      nightly:
        description: Recompress the demo model every night.
        data: {source: synthetic}
        model: {name: resnet8}
        schedule: "@daily"
        tags: [demo, nightly]
      manual:
        data: {source: synthetic}
        model: {name: resnet8}
        goal: {speedup: 2.0, metric: macs}
      fanout:
        data: {source: synthetic}
        model: {name: resnet8}
        search: {n_trials: 6, workers: 3, storage: "postgresql+psycopg2://postgres@127.0.0.1:5432/test"}
    """
)


@pytest.fixture
def pipelines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_pipelines(PIPELINES, tmp_path, monkeypatch)


_dagbag = dagbag


def test_one_dag_per_pipeline(pipelines: Path, tmp_path: Path) -> None:
    bag = _dagbag(tmp_path)
    assert bag.import_errors == {}
    assert sorted(d for d in bag.dag_ids if d.startswith("shrinkflow__")) == [
        "shrinkflow__fanout",
        "shrinkflow__manual",
        "shrinkflow__nightly",
    ]


def test_tasks_run_start_then_stages_in_order(pipelines: Path, tmp_path: Path) -> None:
    dag = _dagbag(tmp_path).dags["shrinkflow__manual"]
    assert dag.task_ids == ["start", *STAGES]
    assert dag.get_task("start").upstream_task_ids == set()
    for before, stage in zip(("start", *STAGES), STAGES, strict=False):
        # every stage reads the run id from start, and waits for the stage before it
        assert dag.get_task(stage).upstream_task_ids == {"start", before}
    assert dag.get_task("register").downstream_task_ids == set()
    assert all(t.retries == 2 and t.retry_exponential_backoff for t in dag.tasks)


def test_search_fans_out_to_mapped_workers(pipelines: Path, tmp_path: Path) -> None:
    dag = _dagbag(tmp_path).dags["shrinkflow__fanout"]
    assert dag.task_ids == ["start", "prepare_data", "train_base", "search_setup", "search_worker", *STAGES[2:]]
    assert dag.get_task("search_setup").upstream_task_ids == {"start", "train_base"}
    worker = dag.get_task("search_worker")
    assert type(worker).__name__.endswith("MappedOperator")
    assert worker.upstream_task_ids == {"start", "search_setup"}
    assert worker.op_kwargs_expand_input.value == {"index": [0, 1, 2]}
    assert dag.get_task("search").upstream_task_ids == {"start", "search_worker"}
    # without workers the search is one task, as every other stage
    assert "search_worker" not in _dagbag(tmp_path).dags["shrinkflow__manual"].task_ids


def test_sqlite_cannot_take_many_workers(pipelines: Path, tmp_path: Path) -> None:
    pipelines.write_text(PIPELINES.replace("postgresql+psycopg2://postgres@127.0.0.1:5432/test", "sqlite:///x.db"))
    (error,) = _dagbag(tmp_path).import_errors.values()
    assert "SQLite cannot take concurrent writers" in error and "search.storage" in error


def test_stage_order_matches_tasks_stages(pipelines: Path, tmp_path: Path) -> None:
    from tasks.stage_specs import STAGES as declared

    assert _dagbag(tmp_path).dags["shrinkflow__manual"].task_ids[1:] == list(declared)


def test_dag_settings_come_from_the_pipeline(pipelines: Path, tmp_path: Path) -> None:
    bag = _dagbag(tmp_path)
    nightly, manual = bag.dags["shrinkflow__nightly"], bag.dags["shrinkflow__manual"]
    assert nightly.schedule == "@daily"
    assert type(nightly.timetable).__name__ == "CronTriggerTimetable"
    assert manual.schedule is None
    assert type(manual.timetable).__name__ == "NullTimetable"
    for d in (nightly, manual):
        assert d.catchup is False
        assert d.max_active_runs == 1
    assert sorted(nightly.tags) == ["demo", "nightly", "shrinkflow"]
    assert sorted(manual.tags) == ["shrinkflow"]
    assert "Recompress the demo model every night." in nightly.doc_md


def test_start_picks_conf_run_id_else_sanitized_airflow_run_id(pipelines: Path, tmp_path: Path) -> None:
    start = _dagbag(tmp_path).dags["shrinkflow__manual"].get_task("start").python_callable
    airflow_run_id = "manual__2026-01-02T03:04:05+00:00"
    assert start(dag_run=SimpleNamespace(conf={"run_id": "mine"}), run_id=airflow_run_id) == "mine"
    assert (
        start(dag_run=SimpleNamespace(conf={}), run_id=airflow_run_id) == "manual__2026-01-02T03-04-05-00-00"
    )


def test_invalid_pipelines_file_is_an_import_error(pipelines: Path, tmp_path: Path) -> None:
    pipelines.write_text("pipelines:\n  broken:\n    data: {source: nowhere}\n    model: {name: resnet8}\n")
    bag = _dagbag(tmp_path)
    assert not [d for d in bag.dag_ids if d.startswith("shrinkflow__")]
    (error,) = bag.import_errors.values()
    assert "ConfigError" in error
    assert "pipelines.broken.data.source" in error
    assert "nowhere" in error


def test_relative_pipelines_path_counts_from_the_repo_root(
    pipelines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the scheduler's cwd must not matter
    monkeypatch.setenv("SHRINKFLOW_PIPELINES", "pipelines.yaml")
    with embedded_airflow(tmp_path / "ws", migrate=False):
        os.environ["SHRINKFLOW_PIPELINES"] = "pipelines.yaml"  # embedded_airflow made it absolute; undo
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    assert "shrinkflow__digits_tiny" in bag.dag_ids  # the repo's pipelines.yaml, not tmp_path's
    assert "shrinkflow__nightly" not in bag.dag_ids


@pytest.mark.parametrize("dag_file", [DAG_FILE, DAGS_FOLDER / "example_train_base.py"], ids=lambda p: p.stem)
def test_parsing_imports_no_heavy_modules(pipelines: Path, tmp_path: Path, dag_file: Path) -> None:
    probe = textwrap.dedent(
        """
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("shrinkflow_dag_probe", sys.argv[1])
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        heavy = ("torch", "tvm", "mlflow", "optuna", "onnx", "tasks.stages", "tasks.stage_runner", "tasks.models")
        print("HEAVY=" + ",".join(m for m in heavy if m in sys.modules))
        """
    )
    env = {**os.environ, **airflow_env(tmp_path / "ws", pipelines=pipelines)}
    out = subprocess.run(
        [sys.executable, "-c", probe, str(dag_file)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (heavy,) = [line for line in out.stdout.splitlines() if line.startswith("HEAVY=")]
    assert heavy == "HEAVY="


def test_airflow_env_keeps_user_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)
    env = airflow_env(tmp_path / "ws")
    assert env["AIRFLOW_HOME"] == str((tmp_path / "ws" / "airflow").resolve())
    assert (
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path.resolve()}/ws/airflow/airflow.db"
    )
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(DAGS_FOLDER)
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    postgres = "postgresql+psycopg2://shrinkflow@127.0.0.1:5432/airflow"
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", postgres)
    assert airflow_env(tmp_path / "ws")["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == postgres


def test_run_pipeline_unknown_name_fails_before_airflow(pipelines: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownPipelineError, match="manual, nightly"):
        run_pipeline("nope", config_path=pipelines, workspace=tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_dag_runs_in_process_with_stand_in_stages(
    pipelines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole DAG through dag.test on SQLite, the stages replaced by a recorder (no torch)."""
    calls: list[dict] = []

    def run_stage(stage, pipeline, run_id, *, config_path=None, workspace=None, airflow_run_id=None):
        if stage == os.environ.get("FAKE_STAGE_FAILS"):
            raise RuntimeError(f"{stage} broke")
        calls.append(
            {
                "stage": stage,
                "pipeline": pipeline,
                "run_id": run_id,
                "airflow_run_id": airflow_run_id,
                "config_path": config_path,
                "home": os.environ["SHRINKFLOW_HOME"],
            }
        )
        return {"stage": stage, "run_id": run_id}

    monkeypatch.setitem(
        sys.modules, "tasks.stage_runner", types.SimpleNamespace(run_stage=run_stage)
    )
    ws = tmp_path / "ws"

    result = run_pipeline("manual", "my run:1", config_path=pipelines, workspace=ws)
    assert result["state"] == "success"
    assert result["run_id"] == "my-run-1"
    assert result["tasks"] == {t: "success" for t in ("start", *STAGES)}
    assert [c["stage"] for c in calls] == list(STAGES)
    assert {(c["pipeline"], c["run_id"], c["airflow_run_id"]) for c in calls} == {
        ("manual", "my-run-1", result["airflow_run_id"])
    }
    assert {c["config_path"] for c in calls} == {str(pipelines.resolve())}
    assert {c["home"] for c in calls} == {str(ws.resolve())}
    assert (ws / "airflow" / "airflow.db").is_file()
    assert "AIRFLOW_HOME" not in os.environ  # run_pipeline leaves the process environment as it was

    monkeypatch.setenv("FAKE_STAGE_FAILS", "compress")
    with pytest.raises(PipelineRunError, match="failed at task compress") as err:
        run_pipeline("manual", "again", config_path=pipelines, workspace=ws)
    message = str(err.value)
    assert "RuntimeError: compress broke" in message
    assert "not run: finetune, compile, benchmark, register" in message
    assert isinstance(err.value.__cause__, RuntimeError)
    log = ws / "airflow" / "logs" / "dag_test" / "shrinkflow__manual" / "again.log"
    assert str(log) in message and "compress broke" in log.read_text()
