"""The registry's champion alias: who holds it, moving it (register gate, promote, rollback), the record.

Every move sets the aliases `champion` (the new one) and `previous-champion` (the one it replaced, where
rollback goes), tags both versions with who/when/why, appends to the registered model's
`champion_history` tag (JSON, newest last), and is an MLflow run of its own in the pipeline's
experiment for promote and rollback (the register stage's run records its own decision). Rollback
undoes the last forward move; repeated rollbacks undo earlier ones in reverse order.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.errors import ShrinkflowError
from tasks.tracking import TAG_PIPELINE, TAG_STAGE, experiment_id, tracking_uri
from tasks.workspace import RunPaths, workspace_root

CHAMPION, PREVIOUS = "champion", "previous-champion"
HISTORY_TAG = "champion_history"
HISTORY_CHARS = 4500  # MLflow keeps tag values up to 5000 characters: oldest entries drop first


class RegistryError(ShrinkflowError):
    """A registry operation that cannot be done (unknown model or version, nothing to roll back to)."""


def registered_name(pipeline: str, point: str | None = None) -> str:
    """The registered model of a pipeline; of one point of its frontier (goal.frontier), e.g. point '2x'."""
    return f"shrinkflow-{pipeline}" + (f"-{point}" if point else "")


def registry_paths(pipeline: str, workspace: str | os.PathLike | None = None) -> RunPaths:
    """RunPaths for the pipeline's registry operations (only the workspace's MLflow store is used)."""
    return RunPaths(workspace_root(workspace), pipeline, "registry")


def client_for(paths: RunPaths) -> Any:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(paths)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version holding alias, or None (MLflow raises for an alias nobody holds)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


LOCK_DB_ENV = "SHRINKFLOW_LOCK_DB"
LOCK_TIMEOUT_S = 600


@contextlib.contextmanager
def registry_lock(root: Path, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialise champion decisions for one registered model.

    With $SHRINKFLOW_LOCK_DB (a PostgreSQL URL; the scale-out deployments set it): an advisory lock,
    which holds across machines and is released by the server if the holder dies. Otherwise a file
    lock in the workspace (one machine, or workers on one shared POSIX volume).
    """
    url = os.environ.get(LOCK_DB_ENV, "").strip()
    if url:
        with _advisory_lock(url, name, timeout_s):
            yield
        return
    with _file_lock(root, name):
        yield


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"shrinkflow-registry:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _advisory_lock(url: str, name: str, timeout_s: float) -> Iterator[None]:
    import sqlalchemy as sa

    from tasks.services import check_database, redact

    fix = f"Start PostgreSQL, fix ${LOCK_DB_ENV}, or unset it to lock in the workspace (one machine)"
    check_database(url, f"champion lock database (${LOCK_DB_ENV})", fix)  # dead: an error in seconds
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f"SET lock_timeout = '{int(timeout_s * 1000)}ms'"))
            try:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(name)})
            except sa.exc.OperationalError as e:
                raise RegistryError(
                    f"the champion lock for {name} ({redact(url)}) was not free after {timeout_s:.0f} s: "
                    "another run's register stage holds it; retry when it is done") from e
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)})
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(root: Path, name: str) -> Iterator[None]:
    lock_dir = Path(root) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def history(client: Any, name: str) -> list[dict[str, Any]]:
    """The champion moves recorded on the registered model, oldest first."""
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    try:
        return json.loads(raw) if raw else []
    except json.JSONDecodeError:
        return []


def undo_stack(moves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The forward moves (register, promote) not undone by a later rollback, oldest first."""
    stack: list[dict[str, Any]] = []
    for m in moves:
        if m["action"] != "rollback":
            stack.append(m)
        elif stack:
            stack.pop()
    return stack


def _who() -> str:
    try:
        return os.environ.get("SHRINKFLOW_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def move_champion(client: Any, name: str, version: str, *, action: str, reason: str,
                  previous: str | None = None, by: str | None = None) -> dict[str, Any]:
    """Give `version` the champion alias and record the move; previous: the version rollback would go to
    next (default: the current champion)."""
    old = alias_version(client, name, CHAMPION)
    old_v = str(old.version) if old is not None else None
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": action, "from": old_v, "to": str(version),
             "by": by or _who(), "reason": reason}
    client.set_registered_model_alias(name, CHAMPION, str(version))
    prev = previous if action == "rollback" else old_v
    if prev is not None and prev != str(version):
        client.set_registered_model_alias(name, PREVIOUS, prev)
    elif alias_version(client, name, PREVIOUS) is not None:
        client.delete_registered_model_alias(name, PREVIOUS)
    for k in ("at", "by", "reason", "action"):
        client.set_model_version_tag(name, str(version), f"champion.{k}", str(entry[k]))
    if old_v is not None and old_v != str(version):
        for k in ("at", "by", "reason"):
            client.set_model_version_tag(name, old_v, f"demoted.{k}", str(entry[k]))
    past = [*history(client, name), entry]
    while len(past) > 1 and len(json.dumps(past)) > HISTORY_CHARS:
        past.pop(0)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(past))
    return entry


def _record_run(paths: RunPaths, client: Any, entry: dict[str, Any], name: str) -> str:
    """An MLflow run in the pipeline's experiment for a manual move, so auditors see it beside the runs."""
    run = client.create_run(
        experiment_id(paths), run_name=f"{entry['action']} {name} v{entry['from']} -> v{entry['to']}",
        tags={TAG_STAGE: "registry", TAG_PIPELINE: paths.pipeline, "registry.model": name,
              **{f"registry.{k}": str(v) for k, v in entry.items()}},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _model(client: Any, pipeline: str, point: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    name = registered_name(pipeline, point)
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        what = f"pipeline {pipeline!r}" + (f" (frontier point {point})" if point else "")
        raise RegistryError(f"no registered model {name!r} in this workspace's MLflow: {what} has not registered "
                            "a version yet (run it first), or pass the right --pipeline / --point / --workspace") from e
    return name


def _version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"{name} has no version {version!r}; versions: {', '.join(map(str, known)) or '(none)'}"
                            ) from e


def default_pipeline(workspace: str | os.PathLike | None = None) -> str:
    """The pipeline of the only shrinkflow registered model in the workspace (for --pipeline left out)."""
    names = [m.name for m in client_for(registry_paths("_", workspace)).search_registered_models()
             if m.name.startswith("shrinkflow-")]
    if len(names) != 1:
        found = ", ".join(n.removeprefix("shrinkflow-") for n in names) or "none"
        raise RegistryError(f"name the pipeline with --pipeline (registered pipelines: {found})")
    return names[0].removeprefix("shrinkflow-")


def promote(pipeline: str, version: str, *, reason: str = "", workspace: str | os.PathLike | None = None,
            by: str | None = None, point: str | None = None) -> dict[str, Any]:
    """Move the champion alias to `version` by hand; the old champion becomes previous-champion.
    `point`: the registered model of that frontier point (e.g. '3x') instead of the pipeline's."""
    paths = registry_paths(pipeline, workspace)
    client = client_for(paths)
    name = _model(client, pipeline, point)
    mv = _version(client, name, version)
    with registry_lock(paths.root, name):
        cur = alias_version(client, name, CHAMPION)
        if cur is not None and str(cur.version) == str(mv.version):
            raise RegistryError(f"{name} version {mv.version} is already the champion; nothing to promote")
        entry = move_champion(client, name, str(mv.version), action="promote", reason=reason or "promoted by hand", by=by)
    entry["mlflow_run"] = _record_run(paths, client, entry, name)
    return {"model": name, **entry}


def rollback(pipeline: str, *, reason: str = "", workspace: str | os.PathLike | None = None,
             by: str | None = None, point: str | None = None) -> dict[str, Any]:
    """Move the champion alias back to previous-champion (undo the last forward move); the move before
    it, if it brought that version in, gives the next previous-champion. `point`: as for promote."""
    paths = registry_paths(pipeline, workspace)
    client = client_for(paths)
    name = _model(client, pipeline, point)
    with registry_lock(paths.root, name):
        target = alias_version(client, name, PREVIOUS)
        if target is None:
            raise RegistryError(f"{name} has no previous champion to roll back to (alias {PREVIOUS!r} is unset); "
                                "use `shrinkflow promote <version>` to pick one")
        # Rollback undoes the last forward move; the next one undoes the move before it, if that one
        # brought in the version we return to.
        stack = undo_stack(history(client, name))[:-1]
        before = stack[-1]["from"] if stack and stack[-1]["to"] == str(target.version) else None
        entry = move_champion(client, name, str(target.version), action="rollback", previous=before,
                              reason=reason or "rolled back by hand", by=by)
    entry["mlflow_run"] = _record_run(paths, client, entry, name)
    return {"model": name, **entry}


def download_package(client: Any, name: str, version: str, dest: Path, uri: str) -> Path:
    """A version's package folder, downloaded to dest (a pyfunc version or an older plain folder)."""
    import mlflow.artifacts

    from tasks.serving import package_dir

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    src = client.get_model_version_download_uri(name, str(version))
    local = mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=str(dest), tracking_uri=uri)
    return package_dir(Path(local))
