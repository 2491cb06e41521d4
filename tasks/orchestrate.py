"""Airflow embedded on one machine: the settings, an in-process DAG run (`dag.test` on SQLite), the UIs.

Airflow reads its configuration when it is first imported, so nothing here imports airflow at module
top: each entry point sets the environment from `airflow_env` first and imports airflow after.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tasks.errors import PipelineRunError, ShrinkflowError

REPO_ROOT = Path(__file__).resolve().parent.parent
DAGS_FOLDER = REPO_ROOT / "dags"
DAG_FILE = DAGS_FOLDER / "shrinkflow_pipelines.py"
DAG_ID_PREFIX = "shrinkflow__"
AIRFLOW_PORT = 8080
MLFLOW_PORT = 5000


def dag_id(pipeline: str) -> str:
    return f"{DAG_ID_PREFIX}{pipeline}"


def airflow_env(
    workspace: str | os.PathLike, *, pipelines: str | os.PathLike | None = None
) -> dict[str, str]:
    """Environment for Airflow embedded in the workspace; AIRFLOW__* already set by the user win.

    `pipelines`, when given, is exported (absolute) as SHRINKFLOW_PIPELINES so the DAG file and the
    stages read the same file whatever the working directory.
    """
    ws = Path(workspace).resolve()
    home = ws / "airflow"
    port = os.environ.get("AIRFLOW__API__PORT", str(AIRFLOW_PORT))
    defaults = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # Airflow rejects relative SQLite paths; scale-out sets a PostgreSQL URL here instead.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        # Airflow logs every task-state call at INFO; warnings and task tracebacks still show.
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        # Only for `up`: the UI on loopback, and workers reach the execution API there
        # (the default, localhost, may resolve to ::1 while the server listens on 127.0.0.1).
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": port,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
    }
    env = {"AIRFLOW_HOME": str(home), "SHRINKFLOW_HOME": str(ws)}
    if pipelines is not None:
        env["SHRINKFLOW_PIPELINES"] = str(Path(pipelines).resolve())
    env.update({key: os.environ.get(key, value) for key, value in defaults.items()})
    return env


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Set `env` in os.environ for the block, then restore it, so one run does not leak into the next."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        # In-process tasks leave AIRFLOW_CTX_* (dag id, run id, ...) behind in os.environ.
        for key in [k for k in os.environ if k.startswith("AIRFLOW_CTX_") and k not in saved]:
            saved[key] = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _configure_airflow(env: dict[str, str]) -> None:
    """Import airflow under `env`; if an earlier import saw another environment, re-point it."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)  # SQLite will not create the folder
    already_imported = "airflow.settings" in sys.modules
    from airflow import settings

    if already_imported:
        # Airflow read its config at import (maybe another workspace, e.g. an earlier test). Its conf
        # reads AIRFLOW__* from os.environ on every get, so re-deriving the globals and the ORM is enough.
        settings.configure_vars()
        settings.reconfigure_orm()
    want_db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    want_dags = env["AIRFLOW__CORE__DAGS_FOLDER"]
    if settings.SQL_ALCHEMY_CONN != want_db or Path(settings.DAGS_FOLDER) != Path(want_dags):
        raise ShrinkflowError(
            f"airflow is configured for {settings.SQL_ALCHEMY_CONN} / {settings.DAGS_FOLDER}, not "
            f"{want_db} / {want_dags}: it was imported before shrinkflow set its environment. Run in a "
            "fresh process, or export the variables from tasks.orchestrate.airflow_env before importing airflow."
        )


def _db_is_current() -> bool:
    """The metadata DB is at Airflow's migration head (about 0.05 s; `airflow db migrate` takes ~1 s)."""
    import airflow
    from airflow import settings
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(Path(airflow.__file__).parent / "migrations"))
    with settings.get_engine().connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == set(script.get_heads())


def _migrate_db(env: dict[str, str]) -> bool:
    """`airflow db migrate` in-process when the DB is missing or behind; returns whether it ran."""
    import fcntl

    from airflow.utils import db

    if _db_is_current():
        return False
    # Two `shrinkflow run`s on a fresh workspace would both try to create the SQLite schema.
    with open(Path(env["AIRFLOW_HOME"]) / ".migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _db_is_current():
            return False
        db.upgradedb()  # creates the schema from the ORM on an empty DB, as `airflow db migrate` does
    return True


@contextlib.contextmanager
def embedded_airflow(
    workspace: str | os.PathLike | None = None,
    *,
    config_path: str | os.PathLike | None = None,
    migrate: bool = True,
) -> Iterator[dict[str, str]]:
    """Airflow in this process, configured by `airflow_env` (and its DB migrated) for the block.

    Safe when airflow was imported earlier under other settings (e.g. by an earlier test): the
    settings and the ORM are re-pointed. Yields the environment in effect.
    """
    from tasks.config import pipelines_path
    from tasks.workspace import workspace_root

    env = airflow_env(workspace_root(workspace), pipelines=pipelines_path(config_path).resolve())
    with _environment(env):
        _configure_airflow(env)
        if migrate:
            _migrate_db(env)
        yield env


def _load_dag(dag_id_: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    if bag.import_errors:
        errors = "\n".join(bag.import_errors.values())
        raise ShrinkflowError(f"{DAG_FILE} does not import:\n{errors}")
    dag = bag.dags.get(dag_id_)
    if dag is None:
        raise ShrinkflowError(f"{DAG_FILE} defines no DAG {dag_id_!r}; it has: {', '.join(sorted(bag.dags))}")
    return dag


@contextlib.contextmanager
def _failed_task_errors() -> Iterator[dict[str, BaseException | str | None]]:
    """Collect the exception of each failed task (dag.test runs the tasks in this process)."""
    from airflow.listeners import hookimpl
    from airflow.sdk.listener import get_listener_manager

    errors: dict[str, BaseException | str | None] = {}

    class Listener:  # defined here: the hookimpl marker needs airflow, which stays out of module top
        @hookimpl
        def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
            errors[task_instance.task_id] = error

    listener = Listener()
    manager = get_listener_manager()
    manager.add_listener(listener)
    try:
        yield errors
    finally:
        manager.pm.unregister(listener)


class _Tee:
    """Writes to a stream and, while open, to a log file too."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        if not self._log.closed:
            self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        if not self._log.closed:
            self._log.flush()
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _tee_output(log_file: Path) -> Iterator[None]:
    """Copy stdout (Airflow's and the tasks' logs) and stderr (stage progress) into `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    with open(log_file, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} =====\n")
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def _state(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def _unwrap(err: Any) -> Any:
    """The error behind an AirflowFailException (how the DAG fails a task without retries), else `err`."""
    if type(err).__name__ == "AirflowFailException" and isinstance(err.__cause__, BaseException):
        return err.__cause__
    return err


def _failure_message(
    pipeline: str, run_id: str, tasks: dict[str, str | None], errors: dict, log: Path
) -> str:
    failed = [t for t, s in tasks.items() if s == "failed"]
    not_run = [t for t, s in tasks.items() if s in ("upstream_failed", None)]
    lines = [f"pipeline {pipeline!r}, run {run_id!r} failed at task {', '.join(failed) or '(none)'}"]
    for task_id in failed:
        err = _unwrap(errors.get(task_id))
        if isinstance(err, BaseException):
            lines.append(f"  {task_id}: {type(err).__name__}: {err}")
        elif err:
            lines.append(f"  {task_id}: {err}")
    if not_run:
        lines.append(f"  not run: {', '.join(not_run)}")
    lines.append(
        f"The traceback is in the output above and in {log}. Fix the cause, then re-run the same run: "
        f"shrinkflow run {pipeline} --run-id {run_id}"
    )
    return "\n".join(lines)


def run_pipeline(
    pipeline: str,
    run_id: str | None = None,
    *,
    config_path: str | os.PathLike | None = None,
    workspace: str | os.PathLike | None = None,
    conf: dict[str, Any] | None = None,
    retries: int = 0,
) -> dict[str, Any]:
    """Run the pipeline's DAG once, in this process, through Airflow (`dag.test`) on the embedded DB.

    `conf` holds the trigger params (goal, base_model, force, overrides; see tasks/run_params.py).
    `retries`: how often a task that failed transiently is tried again (the scheduler's DAGs retry twice;
    here 0 by default: someone is watching, so the run stops at once and prints how to resume it).
    Unchanged stages are reused (each task calls run_stage).
    """
    from tasks.config import load_pipeline, pipelines_path
    from tasks.workspace import new_run_id, sanitize_run_id

    config = pipelines_path(config_path).resolve()
    load_pipeline(pipeline, config)  # unknown name or broken file: fail before touching Airflow
    run_id = sanitize_run_id(run_id or new_run_id())
    # Read by the DAG file when it is parsed (here, and by dag.test's own parse of the folder).
    retry_env = {"SHRINKFLOW_TASK_RETRIES": str(retries)}
    with embedded_airflow(workspace, config_path=config) as env, _environment(retry_env):
        dag = _load_dag(dag_id(pipeline))
        log_file = Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]) / "dag_test" / dag.dag_id / f"{run_id}.log"
        with _failed_task_errors() as errors, _tee_output(log_file):
            dag_run = dag.test(run_conf={**(conf or {}), "run_id": run_id})
        states = {ti.task_id: _state(ti.state) for ti in dag_run.get_task_instances()}
        tasks = {task_id: states.get(task_id) for task_id in dag.task_ids}  # in the DAG's order

    result = {
        "pipeline": pipeline,
        "run_id": run_id,
        "airflow_run_id": dag_run.run_id,
        "state": _state(dag_run.state),
        "tasks": tasks,
    }
    if result["state"] != "success":
        error = PipelineRunError(_failure_message(pipeline, run_id, tasks, errors, log_file))
        first = next((_unwrap(e) for e in errors.values() if isinstance(e, BaseException)), None)
        raise error from first
    return result


def _airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def list_dags(
    workspace: str | os.PathLike | None = None, *, config_path: str | os.PathLike | None = None
) -> list[str]:
    """The DAG ids `airflow dags list --local` sees under shrinkflow's environment."""
    with embedded_airflow(workspace, config_path=config_path):  # the CLI refuses an unmigrated DB
        proc = subprocess.run(
            [_airflow_bin(), "dags", "list", "--local", "--output", "json"],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=300,
        )
    # Airflow's own warnings (e.g. graphviz missing) share stdout; the JSON is the line that parses.
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("["):
            return sorted(d["dag_id"] for d in json.loads(line))
    if proc.returncode == 0 and "No data found" in proc.stdout:
        return []
    raise ShrinkflowError(
        f"`airflow dags list` failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
    )
