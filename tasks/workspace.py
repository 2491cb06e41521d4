"""Where artifacts live: .shrinkflow/ scoped by pipeline and run id, every write atomic."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import StageError

_RUN_ID_OK = re.compile(r"[^A-Za-z0-9_.-]+")


def workspace_root(path: str | os.PathLike | None = None) -> Path:
    """The workspace: the argument, $SHRINKFLOW_HOME, or ./.shrinkflow."""
    return Path(path or os.environ.get("SHRINKFLOW_HOME") or ".shrinkflow").resolve()


def project_workspace(path: str | os.PathLike | None = None, config_path: str | os.PathLike | None = None) -> Path:
    """The workspace of a project: the argument, $SHRINKFLOW_HOME, or .shrinkflow beside the pipelines file
    (so `shrinkflow --config /elsewhere/p.yaml ...` keeps its artifacts in /elsewhere, whatever the cwd)."""
    from tasks.config import project_dir

    if path or os.environ.get("SHRINKFLOW_HOME"):
        return workspace_root(path)
    return project_dir(path=config_path) / ".shrinkflow"


def sanitize_run_id(run_id: str) -> str:
    """A run id safe as a folder name (Airflow run ids carry ':' and '+')."""
    clean = _RUN_ID_OK.sub("-", run_id).strip("-.")
    if not clean:
        raise StageError(f"run id {run_id!r} has no usable characters")
    return clean


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `final` only if the block succeeds.

    A failed stage leaves nothing behind, and a re-run replaces the old output whole.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")  # unique across machines sharing a volume
        os.replace(final, old)
    os.replace(scratch, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class RunPaths:
    """The folders of one pipeline run."""

    root: Path
    pipeline: str
    run_id: str

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.pipeline / self.run_id

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def require(self, stage: str, filename: str) -> Path:
        """A file an earlier stage wrote; a clear error when that stage has not run."""
        p = self.stage_dir(stage) / filename
        if not p.exists():
            raise StageError(
                f"{p} is missing: stage '{stage}' has not run for pipeline {self.pipeline!r}, "
                f"run {self.run_id!r}. Run it first: python -m tasks {stage} --pipeline {self.pipeline} "
                f"--run-id {self.run_id}"
            )
        return p

    @property
    def state_file(self) -> Path:
        return self.run_dir / "run.json"

    def read_state(self) -> dict[str, Any]:
        """run.json; with an object store, the published one (the local copy is a cache of it)."""
        from tasks.object_store import current

        store = current()
        if store is not None:
            data = store.get_bytes(self._rel("run.json"))
            if data is not None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_json(self.state_file, json.loads(data))
        return read_json(self.state_file) if self.state_file.exists() else {}

    def update_state(self, **fields: Any) -> dict[str, Any]:
        from tasks.object_store import current

        state = self.read_state()
        state.update(fields)
        write_json(self.state_file, state)
        if (store := current()) is not None:
            store.put_bytes(self._rel("run.json"), self.state_file.read_bytes())
        return state

    # With an object store ($SHRINKFLOW_ARTIFACTS), folders of the run are published and pulled whole.
    def _rel(self, name: str) -> str:
        return f"runs/{self.pipeline}/{self.run_id}/{name}"

    def pull(self, name: str) -> bool:
        """Bring the run's published folder `name` (a stage, search_shared) here; False without a store
        or when it is not published."""
        from tasks.object_store import current

        store = current()
        return store is not None and store.pull(self._rel(name), self.run_dir / name, self.root / "cache" / "blobs")

    def publish(self, name: str, manifest: dict[str, Any] | None = None) -> None:
        """Publish the run's folder `name` to the object store (nothing without one)."""
        from tasks.object_store import current

        if (store := current()) is not None:
            store.publish(self.run_dir / name, self._rel(name), manifest)

    # Shared, content-addressed places (not per run).
    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"


def run_paths(pipeline: str, run_id: str, root: str | os.PathLike | None = None) -> RunPaths:
    return RunPaths(workspace_root(root), pipeline, sanitize_run_id(run_id))


def list_runs(root: str | os.PathLike | None = None) -> list[RunPaths]:
    """Every run in the workspace, oldest first."""
    base = workspace_root(root) / "runs"
    out = []
    if base.is_dir():
        for pdir in sorted(base.iterdir()):
            if pdir.is_dir():
                for rdir in pdir.iterdir():
                    if rdir.is_dir() and not rdir.name.startswith("."):
                        out.append(RunPaths(workspace_root(root), pdir.name, rdir.name))
    return sorted(out, key=lambda r: r.run_dir.stat().st_mtime)
