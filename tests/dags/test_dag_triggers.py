"""Schedules, trigger params and retries of the pipeline DAGs, and the example training DAG's asset."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from dag_helpers import dagbag, use_pipelines

from tasks.errors import ConfigError, DeviceError, StageError, TransientError
from tasks.orchestrate import DAG_FILE, PipelineRunError, embedded_airflow, run_pipeline

REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare_data", "train_base", "search", "compress", "finetune", "compile", "benchmark", "register")
PIPELINES = textwrap.dedent(
    """
    pipelines:
      manual:
        data: {source: synthetic}
        model: {name: resnet8}
        goal: {speedup: 2.0, metric: macs, max_accuracy_drop: 1.5}
      on_alias:
        data: {source: synthetic}
        model: {name: resnet8, weights: 'models:/digits-base@production'}
        schedule: {model_alias: 'models:/digits-base@production'}
    """
)


@pytest.fixture
def pipelines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_pipelines(PIPELINES, tmp_path, monkeypatch)


def _dagbag(tmp_path: Path):
    bag = dagbag(tmp_path)
    assert bag.import_errors == {}
    return bag


def _dag_module(tmp_path: Path) -> types.ModuleType:
    """The DAG file as a module, for its task wrapper."""
    with embedded_airflow(tmp_path / "ws", migrate=False):
        spec = importlib.util.spec_from_file_location("shrinkflow_dag_under_test", DAG_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_shipped_schedules(pipelines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fashion_resnet runs nightly, digits_registered when the example DAG moves the alias; all start paused."""
    monkeypatch.setenv("SHRINKFLOW_PIPELINES", str(REPO / "pipelines.yaml"))
    bag = _dagbag(tmp_path)
    nightly = bag.dags["shrinkflow__fashion_resnet"]
    assert nightly.schedule == "0 2 * * *" and type(nightly.timetable).__name__ == "CronTriggerTimetable"
    consumer, producer = bag.dags["shrinkflow__digits_registered"], bag.dags["example_train_base"]
    assert type(consumer.timetable).__name__ == "AssetTriggeredTimetable"
    (asset,) = consumer.schedule
    (outlet,) = producer.get_task("train_and_register").outlets
    assert (asset.name, asset.uri) == (outlet.name, outlet.uri) == (
        "models:/digits-base@production", "mlflow-model://digits-base/production")
    assert producer.tags == {"example"} and producer.schedule is None
    assert all(d.is_paused_upon_creation for d in bag.dags.values())


def test_asset_schedule_from_a_pipeline(pipelines: Path, tmp_path: Path) -> None:
    bag = _dagbag(tmp_path)
    (asset,) = bag.dags["shrinkflow__on_alias"].schedule
    assert asset.uri == "mlflow-model://digits-base/production"
    assert bag.dags["shrinkflow__manual"].schedule is None


def test_trigger_form_params(pipelines: Path, tmp_path: Path) -> None:
    """Params with JSON schemas and the pipeline's values as defaults, kept when the DAG is serialized for the UI."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag = _dagbag(tmp_path).dags["shrinkflow__manual"]
    params = {name: dag.params.get_param(name) for name in dag.params}
    assert set(params) == {"speedup", "max_accuracy_drop", "metric", "base_model", "run_id", "force", "overrides"}
    assert (params["speedup"].value, params["max_accuracy_drop"].value, params["metric"].value) == (2.0, 1.5, "macs")
    assert params["speedup"].schema["type"] == ["number", "null"] and params["speedup"].schema["exclusiveMinimum"] == 1
    assert params["metric"].schema["enum"] == ["macs", "latency"]
    assert params["force"].schema["enum"] == [False, True, *STAGES] and params["force"].value is False
    assert params["base_model"].value is None and "models:/<name>/<version>" in params["base_model"].description
    assert all(p.description and p.schema.get("section") for p in params.values())
    dag.params.validate()  # the defaults satisfy their own schemas
    shown = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).params  # what the UI reads
    assert shown.get_param("metric").schema["enum"] == ["macs", "latency"] and shown.get_param("speedup").value == 2.0
    assert shown.get_param("force").schema["values_display"]["compress"] == "compress and after"
    on_alias = _dagbag(tmp_path).dags["shrinkflow__on_alias"]
    assert on_alias.params.get_param("base_model").value == "models:/digits-base@production"


def test_start_task_fails_a_bad_param_without_retry(pipelines: Path, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    start = _dagbag(tmp_path).dags["shrinkflow__manual"].get_task("start").python_callable
    with pytest.raises(AirflowFailException) as err:
        start(dag_run=SimpleNamespace(conf={"speedup": 0.5}), run_id="manual__1")
    assert isinstance(err.value.__cause__, ConfigError)
    assert "goal.speedup" in str(err.value) and "got 0.5" in str(err.value) and "not retried" in str(err.value)
    with pytest.raises(AirflowFailException, match="force 'nope'.*prepare_data"):
        start(dag_run=SimpleNamespace(conf={"force": "nope"}), run_id="manual__2")
    assert not (tmp_path / "ws" / "runs").exists()  # nothing written for a rejected trigger

    run_id = start(dag_run=SimpleNamespace(conf={"speedup": 2.5, "force": True, "overrides": {"train.epochs": 1}}),
                   run_id="manual__2026-01-02T03:04:05+00:00")
    assert run_id == "manual__2026-01-02T03-04-05-00-00"
    state = json.loads((tmp_path / "ws" / "runs" / "manual" / run_id / "run.json").read_text())
    assert state["overrides"] == {"goal": {"speedup": 2.5}, "train": {"epochs": 1}} and state["force"] is True


def test_task_wrapper_fails_config_errors_and_lets_transient_ones_retry(pipelines: Path, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    run_classified = _dag_module(tmp_path).run_classified

    def raises(exc):
        def fn():
            raise exc

        return fn

    with pytest.raises(AirflowFailException, match="ConfigError: goal.speedup") as err:
        run_classified(raises(ConfigError("goal.speedup: greater than 1")))
    assert isinstance(err.value.__cause__, ConfigError)
    for exc in (TransientError("MLflow did not answer"), DeviceError("rk3588 unreachable"), RuntimeError("a bug")):
        with pytest.raises(type(exc)) as err:
            run_classified(raises(exc))
        assert err.value is exc  # raised as it is: Airflow's retries apply

    def stage_over_dead_db():
        import sqlalchemy

        try:
            sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/test").connect()
        except Exception as e:
            raise StageError("study storage did not answer") from e

    with pytest.raises(StageError):
        run_classified(stage_over_dead_db)
    assert run_classified(lambda x: x + 1, 1) == 2


def test_task_retry_settings(pipelines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = _dagbag(tmp_path).dags["shrinkflow__manual"].get_task("train_base")
    assert (task.retries, task.retry_delay.total_seconds(), task.retry_exponential_backoff) == (2, 30, 2.0)
    assert task.max_retry_delay.total_seconds() == 600
    monkeypatch.setenv("SHRINKFLOW_TASK_RETRIES", "many")
    with embedded_airflow(tmp_path / "ws", migrate=False):
        from airflow.dag_processing.dagbag import DagBag

        (error,) = DagBag(dag_folder=str(DAG_FILE)).import_errors.values()
    assert "SHRINKFLOW_TASK_RETRIES='many'" in error


@pytest.mark.slow
def test_dag_test_with_conf_overrides_and_retries(
    pipelines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dag.test (as `shrinkflow run` uses it), stages replaced by a recorder: conf reaches run.json; with
    retries on, a ConfigError fails at once and a transient error is retried; the paused DAG runs anyway."""
    calls: list[str] = []
    fail: dict[str, BaseException] = {}

    def run_stage(stage, pipeline, run_id, *, config_path=None, workspace=None, airflow_run_id=None):
        calls.append(stage)
        if stage in fail:
            raise fail.pop(stage) if isinstance(fail[stage], TransientError) else fail[stage]
        return {"stage": stage, "run_id": run_id}

    monkeypatch.setitem(sys.modules, "tasks.stage_runner", types.SimpleNamespace(run_stage=run_stage))
    ws = tmp_path / "ws"
    conf = {"speedup": 2.5, "force": "compress", "overrides": {"finetune.epochs": 1}}
    result = run_pipeline("manual", "conf-run", config_path=pipelines, workspace=ws, conf=conf)
    assert result["state"] == "success" and calls == list(STAGES)
    state = json.loads((ws / "runs" / "manual" / "conf-run" / "run.json").read_text())
    assert state["overrides"] == {"goal": {"speedup": 2.5}, "finetune": {"epochs": 1}}
    assert state["force"] == "compress"
    with embedded_airflow(ws, migrate=False):
        from airflow.models.dag import DagModel

        assert DagModel.get_dagmodel("shrinkflow__manual").is_paused  # created paused; dag.test ran it

    calls.clear()
    fail["compress"] = ConfigError("compression.plan[0]: unknown op 'magic_shrink'")
    with pytest.raises(PipelineRunError, match="failed at task compress") as err:
        run_pipeline("manual", "config-error", config_path=pipelines, workspace=ws, retries=2)
    assert calls.count("compress") == 1  # not retried
    assert "ConfigError: compression.plan[0]" in str(err.value) and isinstance(err.value.__cause__, ConfigError)

    calls.clear()
    fail.clear()
    fail["compile"] = TransientError("MLflow at http://127.0.0.1:5000 did not answer")
    monkeypatch.setenv("SHRINKFLOW_RETRY_DELAY_S", "0")  # Airflow waits at least 1 s
    result = run_pipeline("manual", "transient", config_path=pipelines, workspace=ws, retries=1)
    assert result["state"] == "success" and calls.count("compile") == 2


@pytest.mark.slow
def test_example_dag_registers_the_base_and_reports_the_asset(
    pipelines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's task itself: a digits base trained, registered as models:/digits-base@production."""
    from collections import defaultdict

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train = _dagbag(tmp_path).dags["example_train_base"].get_task("train_and_register").python_callable
    events: defaultdict = defaultdict(SimpleNamespace)
    result = train(outlet_events=events)
    assert result["alias"] == "production" and result["test_accuracy"] > 50  # trained, not chance (10 %)
    version = MlflowClient(tracking_uri=uri).get_model_version_by_alias("digits-base", "production")
    assert result["model"] == f"models:/digits-base/{version.version}"
    (event,) = events.values()
    assert event.extra["version"] == str(version.version)
