"""MLflow: one experiment per pipeline, a parent run per pipeline run, one child run per stage.

Children point at the parent with the `mlflow.parentRunId` tag, so stages running in different
processes (Airflow workers) still nest. Re-running a stage replaces its child run: one child per stage.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.workspace import RunPaths

TAG_RUN = "shrinkflow.run_id"
TAG_STAGE = "shrinkflow.stage"
TAG_PIPELINE = "shrinkflow.pipeline"


def workspace_tracking_uri(root: Path) -> str:
    """$MLFLOW_TRACKING_URI (a server, PostgreSQL) or SQLite in the workspace folder `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root) / 'mlflow.db'}"


def tracking_uri(paths: RunPaths) -> str:
    """$MLFLOW_TRACKING_URI (a server, PostgreSQL) or SQLite in the workspace."""
    return workspace_tracking_uri(paths.root)


# MLflow's own defaults wait 120 s per request and retry 7 times with backoff 2 (about 4 minutes on a
# dead server, per call). A stage must fail in bounded time when its server goes away mid-run.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def bound_http_requests(uri: str) -> None:
    """Set HTTP_DEFAULTS for a server URI, unless the user set them (MLflow reads them per request)."""
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


def _client(paths: RunPaths):
    # A client, not mlflow.set_tracking_uri: that call also exports MLFLOW_TRACKING_URI to the process.
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(paths)
    bound_http_requests(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(paths: RunPaths) -> str:
    return ensure_experiment(_client(paths), paths.root, f"shrinkflow/{paths.pipeline}", paths.pipeline)


def ensure_experiment(client, root: Path, name: str, folder: str) -> str:
    """The id of experiment `name`, created if missing; with the embedded SQLite default its artifacts
    go to the workspace's mlartifacts/<folder>."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri == f"sqlite:///{Path(root) / 'mlflow.db'}":  # embedded default: artifacts beside the DB
        location = (Path(root) / "mlartifacts" / folder).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another worker created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parent_run_id(paths: RunPaths, tags: dict[str, str] | None = None) -> str:
    """The pipeline run's parent MLflow run, created on first use."""
    client = _client(paths)
    exp = experiment_id(paths)
    found = client.search_runs(
        [exp], filter_string=f"tags.`{TAG_RUN}` = '{paths.run_id}' and tags.`{TAG_STAGE}` = 'pipeline'"
    )
    if found:
        rid = found[0].info.run_id
        for k, v in (tags or {}).items():
            client.set_tag(rid, k, v)
        return rid
    run = client.create_run(
        exp,
        run_name=f"{paths.pipeline}:{paths.run_id}",
        tags={
            TAG_RUN: paths.run_id,
            TAG_STAGE: "pipeline",
            TAG_PIPELINE: paths.pipeline,
            "git_commit": git_commit(),
            **(tags or {}),
        },
    )
    return run.info.run_id


class StageRun:
    """A child run: thin wrapper so stages log without knowing MLflow's API."""

    def __init__(self, client, run_id: str, parent_id: str):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id  # client: an MlflowClient

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, step or 0) for k, v in _flatten(metrics).items() if _is_number(v)]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def tags(self, tags: dict[str, str], on_parent: bool = False) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.parent_id if on_parent else self.run_id, k, str(v))

    def artifact(self, path: Path, artifact_path: str | None = None, on_parent: bool = False) -> None:
        rid = self.parent_id if on_parent else self.run_id
        if path.is_dir():
            self.client.log_artifacts(rid, str(path), artifact_path)
        else:
            self.client.log_artifact(rid, str(path), artifact_path)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _stage_runs(client, paths: RunPaths, stage: str) -> list:
    return client.search_runs(
        [experiment_id(paths)],
        filter_string=f"tags.`{TAG_RUN}` = '{paths.run_id}' and tags.`{TAG_STAGE}` = '{stage}'",
        order_by=["attributes.start_time ASC"],
    )


def _create_stage_run(client, paths: RunPaths, stage: str, parent: str, tags: dict[str, str] | None) -> str:
    run = client.create_run(
        experiment_id(paths),
        run_name=stage,
        tags={
            "mlflow.parentRunId": parent,
            TAG_RUN: paths.run_id,
            TAG_STAGE: stage,
            TAG_PIPELINE: paths.pipeline,
            **(tags or {}),
        },
    )
    return run.info.run_id


def stage_run_id(paths: RunPaths, stage: str, tags: dict[str, str] | None = None) -> str:
    """The stage's child run, created if missing, never replaced (search workers nest trials under it)."""
    client = _client(paths)
    found = _stage_runs(client, paths, stage)
    if found:
        return found[0].info.run_id
    return _create_stage_run(client, paths, stage, parent_run_id(paths, tags), tags)


@contextlib.contextmanager
def stage_run(
    paths: RunPaths, stage: str, tags: dict[str, str] | None = None, *, reuse: bool = False
) -> Iterator[StageRun]:
    """Open the stage's child run (replacing one from an earlier attempt, or continuing it with reuse,
    as the resumable search does); mark it and the parent on exit."""
    client = _client(paths)
    parent = parent_run_id(paths, tags)
    old = _stage_runs(client, paths, stage)
    if reuse and old:
        rid = old[0].info.run_id
        client.update_run(rid, status="RUNNING")
    else:
        for r in old:
            client.delete_run(r.info.run_id)
        rid = _create_stage_run(client, paths, stage, parent, tags)
    run = client.get_run(rid)
    sr = StageRun(client, run.info.run_id, parent)
    try:
        yield sr
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        client.set_terminated(parent, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def finish_parent(paths: RunPaths, status: str = "FINISHED") -> None:
    client = _client(paths)
    client.set_terminated(parent_run_id(paths), status)



class TrialRun(StageRun):
    """A search trial's run, nested under the search stage's run."""

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class TrialTracker:
    """Makes one nested MLflow run per trial under the search stage's run."""

    def __init__(self, paths: RunPaths, search_run: str):
        self.paths, self.search_run = paths, search_run
        self.client = _client(paths)

    def trial_run(self, number: int, worker: int) -> TrialRun:
        run = self.client.create_run(
            experiment_id(self.paths),
            run_name=f"trial {number}",
            tags={
                "mlflow.parentRunId": self.search_run,
                TAG_RUN: self.paths.run_id,
                TAG_STAGE: "search_trial",
                TAG_PIPELINE: self.paths.pipeline,
                "shrinkflow.trial": str(number),
                "shrinkflow.worker": str(worker),
            },
        )
        return TrialRun(self.client, run.info.run_id, self.search_run)

    def trial_runs(self) -> list:
        return self.client.search_runs(
            [experiment_id(self.paths)],
            filter_string=f"tags.`{TAG_RUN}` = '{self.paths.run_id}' and tags.`{TAG_STAGE}` = 'search_trial'",
            max_results=10_000,
        )
