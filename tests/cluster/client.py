"""A REST client of the local cluster's Airflow (as an operator's script uses it) and its other services."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared REST client

from airflow_rest import AirflowRest  # noqa: E402


class ClusterApi(AirflowRest):
    """Airflow's REST API of a local cluster (the simple auth manager's generated admin password)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        home = Path(state["state_dir"]) / "airflow"
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        super().__init__(state["api_url"], password)

    def wait_for_dag(self, dag_id: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{dag_id}")
                break
            except AssertionError as e:
                if time.monotonic() > deadline:
                    errors = self.call("GET", "/api/v2/importErrors").get("import_errors", [])
                    raise AssertionError(f"{dag_id} not parsed in {timeout:.0f} s ({e}); import errors: "
                                         f"{[x.get('stack_trace', '')[-1500:] for x in errors]}") from None
                time.sleep(2)
        self.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, dag_run_id: str, conf: dict | None = None) -> None:
        self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                  {"dag_run_id": dag_run_id, "logical_date": None, "conf": conf or {}})

    def run_state(self, dag_id: str, dag_run_id: str) -> str:
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}")["state"]

    def wait(self, dag_id: str, dag_run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.run_state(dag_id, dag_run_id)) not in ("success", "failed"):
            assert time.monotonic() < deadline, (
                f"{dag_run_id} still {state} after {timeout:.0f} s: {self.task_states(dag_id, dag_run_id)}")
            time.sleep(3)
        return state

    def task_instances(self, dag_id: str, dag_run_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances")["task_instances"]

    def task_states(self, dag_id: str, dag_run_id: str) -> dict[str, Any]:
        return {(ti["task_id"], ti.get("map_index", -1)): (ti["state"], ti.get("hostname"), ti.get("try_number"))
                for ti in self.task_instances(dag_id, dag_run_id)}

    def failed_logs(self, dag_id: str, dag_run_id: str, lines: int = 40) -> str:
        base = Path(self.state["state_dir"]) / "airflow" / "logs" / f"dag_id={dag_id}" / f"run_id={dag_run_id}"
        out = []
        for ti in self.task_instances(dag_id, dag_run_id):
            if ti["state"] in ("failed", "up_for_retry"):
                for log in sorted(base.glob(f"task_id={ti['task_id']}/**/attempt=*.log")):
                    out.append(f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)
