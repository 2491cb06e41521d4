"""digits_tiny through the real Airflow scheduler: api-server, scheduler and dag-processor (LocalExecutor)
on a temporary workspace, triggered over the REST API as an operator would, twice.

The components are the ones `shrinkflow up` starts (tasks/airflow_services.py). Every wait is bounded,
and a failure shows the components' and the failed task's log tails.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
from airflow_rest import AirflowRest

from tasks.airflow_services import Services, free_port, read_admin_password, start_services
from tasks.stage_specs import STAGES

DAG_ID = "shrinkflow__digits_tiny"
GOAL = {"speedup": 1.4}  # a trigger param: pipelines.yaml below says 1.3
# digits_tiny's shape with the smallest settings that still run every stage (DAG id unchanged).
PIPELINES = textwrap.dedent(
    """
    pipelines:
      digits_tiny:
        data: {source: digits, val_fraction: 0.1}
        model: {name: resnet8, kwargs: {width: 8}}
        train: {epochs: 2, batch_size: 64, lr: 0.1}
        goal: {speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}
        compression:
          plan: [{op: channel_prune}]
          sensitivity: {enabled: false}
        search: {n_trials: 0}
        finetune: {epochs: 1, batch_size: 64, lr: 0.05}
        targets: [host]
        compile: {tuning: {budget_s: 0}}
        benchmark: {batch_sizes: [1], warmup: 1, repeat: 3, threads: 1}
    """
)

pytestmark = pytest.mark.slow


class Api(AirflowRest):
    """The Airflow REST API of the started services."""

    def __init__(self, services: Services) -> None:
        self.services = services
        password = read_admin_password(services)
        assert password, f"no admin password was generated:\n{services.logs_tail()}"
        super().__init__(services.api_url, password)

    def wait_for_dag(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{DAG_ID}")
                return
            except AssertionError as e:
                assert time.monotonic() < deadline, f"{DAG_ID} not parsed in {timeout:.0f} s ({e}):\n" \
                    f"{self.services.logs_tail()}"
                time.sleep(2)

    def trigger_and_wait(self, dag_run_id: str, conf: dict, timeout: float) -> dict:
        self.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                  {"dag_run_id": dag_run_id, "logical_date": None, "conf": conf})
        deadline = time.monotonic() + timeout
        while (run := self.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{dag_run_id}"))["state"] not in (
            "success", "failed"
        ):
            assert not self.services.dead(), f"{self.services.dead()} died:\n{self.services.logs_tail()}"
            assert time.monotonic() < deadline, f"{dag_run_id} still {run['state']} after {timeout:.0f} s:\n" \
                f"{self.task_states(dag_run_id)}\n{self.services.logs_tail()}"
            time.sleep(3)
        assert run["state"] == "success", f"{dag_run_id} failed: {self.task_states(dag_run_id)}\n" \
            f"{self.failed_task_logs(dag_run_id)}\n{self.services.logs_tail()}"
        return run

    def task_states(self, dag_run_id: str) -> dict[str, str | None]:
        tis = self.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{dag_run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}

    def failed_task_logs(self, dag_run_id: str) -> str:
        out = []
        for task_id, state in self.task_states(dag_run_id).items():
            if state == "failed":
                for log in task_logs(self.services, dag_run_id, task_id):
                    out.append(f"--- {log} ---\n" + "\n".join(log.read_text().splitlines()[-40:]))
        return "\n".join(out)


def task_logs(services: Services, dag_run_id: str, task_id: str) -> list[Path]:
    base = Path(services.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]) / f"dag_id={DAG_ID}"
    return sorted(base.glob(f"run_id={dag_run_id}/task_id={task_id}/attempt=*.log"))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scheduler")
    pipelines = tmp / "pipelines.yaml"
    pipelines.write_text(PIPELINES)
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith(("AIRFLOW", "MLFLOW", "SHRINKFLOW"))]:
            mp.delenv(key)
        services = start_services(tmp / "ws", config_path=pipelines, api_port=free_port(), mlflow=False,
                                  components=("api-server", "scheduler", "dag-processor"))
    try:
        services.wait_ready(timeout=400)
        client = Api(services)
        client.wait_for_dag(timeout=300)
        client.call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        yield client
    finally:
        services.stop()


def _run_state(api: Api, run_id: str) -> dict:
    return json.loads((api.services.workspace / "runs" / "digits_tiny" / run_id / "run.json").read_text())


def test_a_rest_trigger_runs_every_stage_tracked_under_its_airflow_run_id(api):
    # The trigger form's params: the run id and a goal override, validated and applied for this run only.
    run = api.trigger_and_wait("rest_first", {"run_id": "sched1", **GOAL}, timeout=900)
    states = api.task_states("rest_first")
    assert set(states) == {"start", *STAGES} and set(states.values()) == {"success"}, states
    state = _run_state(api, "sched1")
    assert state["completed"] == list(STAGES)
    assert state["overrides"] == {"goal": GOAL}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{api.services.workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shrinkflow/digits_tiny")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.airflow_run_id = '{run['dag_run_id']}'")
    by_stage = {r.data.tags["shrinkflow.stage"]: r for r in runs}
    assert set(by_stage) == {"pipeline", *STAGES}, sorted(by_stage)
    assert all(r.data.tags["shrinkflow.run_id"] == "sched1" for r in runs)
    assert by_stage["pipeline"].info.status == "FINISHED"

    # Stage progress reaches the task log at info level, not as task.stderr errors.
    (log,) = task_logs(api.services, "rest_first", "train_base")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    progress = [r for r in records if str(r.get("event", "")).startswith("base model: test accuracy")]
    assert [(r["level"], r.get("logger")) for r in progress] == [("info", "shrinkflow")], progress
    assert not [r for r in records if r.get("logger") == "task.stderr" and "[shrinkflow]" in r.get("event", "")]


def test_a_second_trigger_with_nothing_changed_reuses_every_stage(api):
    api.trigger_and_wait("rest_second", {"run_id": "sched2", **GOAL}, timeout=600)
    stages = _run_state(api, "sched2")["stages"]
    why = {s: stages.get(s, {}).get("changed") for s in STAGES if not stages.get(s, {}).get("reused")}
    assert {s: bool(stages.get(s, {}).get("reused")) for s in STAGES} == dict.fromkeys(STAGES, True), why
