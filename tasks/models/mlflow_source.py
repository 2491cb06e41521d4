"""Base weights from MLflow: `models:/<name>@<alias>`, `models:/<name>/<version>` and `runs:/<run_id>/<path>`.

The registry is the one shrinkflow tracks to ($MLFLOW_TRACKING_URI or the workspace's SQLite DB). An
alias is pinned to its version first (aliases move; versions do not), then the artifact is downloaded
once into `<workspace>/cache/base_models/`, keyed by the pinned URI and the registry, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tasks.errors import ModelLoadError, ModelNotRegisteredError, ServiceError
from tasks.models.sources import ResolvedBase, read_artifact, register_source, state_dict_sha256
from tasks.services import redact

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))/?$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9A-Za-z_-]+)/(?P<path>.+)$")
PROBE_TIMEOUT_S = 10
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
T = TypeVar("T")


def registry_uri(root: Path, tracking_uri: str | None = None) -> str:
    """The tracking/registry URI: the argument, $MLFLOW_TRACKING_URI, or SQLite in the workspace."""
    from tasks.tracking import workspace_tracking_uri

    return tracking_uri or workspace_tracking_uri(root)


def probe(uri: str, weights: str) -> None:
    """Fail within ~10 s when the registry's server or database does not answer (MLflow itself retries for minutes)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    try:
        if scheme in ("http", "https"):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
            except urllib.error.HTTPError:
                pass  # something answered: MLflow's own calls report what is wrong
        elif scheme in DB_PORTS and parts.hostname:
            socket.create_connection((parts.hostname, parts.port or DB_PORTS[scheme]), timeout=PROBE_TIMEOUT_S).close()
    except (urllib.error.URLError, OSError) as e:
        raise ServiceError(_unreachable(uri, weights, getattr(e, "reason", e))) from e


def client_for(uri: str, weights: str):
    """An MlflowClient on one tracking/registry URI, after checking that its server answers."""
    probe(uri, weights)
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except ImportError as e:
        raise ModelLoadError(f"MLflow cannot open the registry at {redact(uri)} ({e}) while resolving model.weights "
                             f"{weights!r}; install that database driver or name one in the URI, e.g. "
                             "postgresql+psycopg2://") from e
    except Exception as e:  # the database refused us
        raise ServiceError(_unreachable(uri, weights, f"{type(e).__name__}: {e}")) from e


def _unreachable(uri: str, weights: str, why: object) -> str:
    return (f"the MLflow registry at {redact(uri)} is unreachable ({why}) while resolving model.weights "
            f"{weights!r}; start the MLflow server (or database) or point MLFLOW_TRACKING_URI at the one that "
            "holds the model")


def _lookup(call: Callable[[], T], uri: str, weights: str) -> T | None:
    """The call's result; None when MLflow says the thing does not exist; a ModelLoadError when it cannot ask."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        if e.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise ModelLoadError(f"model.weights {weights!r}: the registry at {redact(uri)} refused it ({e.message})") from e
        raise ServiceError(_unreachable(uri, weights, e.message)) from e
    except Exception as e:  # a database or connection error from the store
        raise ServiceError(_unreachable(uri, weights, f"{type(e).__name__}: {e}")) from e


def cache_dir(root: Path, uri: str, pinned: str) -> Path:
    """The workspace cache folder for one pinned artifact of one registry."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", pinned.split(":/", 1)[-1]).strip("-.")[:80]
    key = hashlib.sha1(f"{uri}\n{pinned}".encode()).hexdigest()[:12]
    return root / "cache" / "base_models" / f"{slug}-{key}"


def fetch(root: Path, uri: str, pinned: str, weights: str, location: str | None = None
          ) -> tuple[Path, str, dict[str, Any] | None]:
    """Download `pinned` (from `location`, where its files are, if given) into the cache once, atomically and
    checked to hold weights; return (local path, sha256, the state_dict when it was just read)."""
    from tasks.workspace import read_json, write_json

    folder = cache_dir(root, uri, pinned)
    if (folder / "meta.json").is_file():
        meta = read_json(folder / "meta.json")
        return folder / meta["path"], meta["sha256"], None
    import mlflow.artifacts

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        (scratch / "artifact").mkdir()
        with _no_progress_bar():
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=location or pinned, dst_path=str(scratch / "artifact"), tracking_uri=uri, registry_uri=uri))
        state = read_artifact(local, weights)
        sha = state_dict_sha256(state)
        rel = local.resolve().relative_to(scratch.resolve()).as_posix()
        write_json(scratch / "meta.json", {"pinned": pinned, "registry": redact(uri), "path": rel, "sha256": sha})
        if folder.exists() and not (folder / "meta.json").is_file():
            shutil.rmtree(folder)  # left by hand without its meta.json: not a complete entry
        try:
            os.rename(scratch, folder)
        except OSError:  # another process cached it first: keep theirs (the same pinned content)
            shutil.rmtree(scratch, ignore_errors=True)
    except ModelLoadError:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ModelLoadError(f"cannot download {pinned} (model.weights {weights!r}) from {redact(uri)}: {e}") from e
    return folder / rel, sha, state


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    # MLflow draws a tqdm bar per download on stderr, which lands in Airflow task logs as noise.
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def _arch_tag(tags: dict[str, str]) -> dict[str, Any] | None:
    try:
        return json.loads(tags["shrinkflow.arch"]) if "shrinkflow.arch" in tags else None
    except ValueError:
        return None


@register_source("models")
def resolve_models(weights: str, root: Path, tracking_uri: str | None = None) -> ResolvedBase:
    """models:/<name>@<alias>, models:/<name>/<version> or models:/<name>/latest, pinned to a version."""
    m = _MODELS.match(weights)
    if m is None:
        raise ModelLoadError(f"model.weights {weights!r} is not a registry URI; write models:/<name>@<alias> or "
                             "models:/<name>/<version>")
    name, alias, version = m["name"], m["alias"], m["version"]
    uri = registry_uri(root, tracking_uri)
    client = client_for(uri, weights)
    rm = _lookup(lambda: client.get_registered_model(name), uri, weights)
    if rm is None:
        known = [r.name for r in _lookup(lambda: client.search_registered_models(max_results=50), uri, weights) or []]
        raise ModelNotRegisteredError(
            f"{weights}: no registered model {name!r} in the registry at {redact(uri)} (it has: "
            f"{', '.join(sorted(known)) or 'none'}). Fix the name, or register the base first: "
            "`shrinkflow register-base <weights> --name NAME --alias production`"
        )
    versions = sorted(int(v.version) for v in _lookup(
        lambda: client.search_model_versions(f"name = '{name}'"), uri, weights) or [])
    if alias:
        aliases = dict(rm.aliases or {})
        if alias not in aliases:
            have = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
            raise ModelNotRegisteredError(
                f"{weights}: registered model {name!r} has no alias {alias!r}; its aliases: {have}. Use one of "
                f"them or a version (models:/{name}/<version>; versions: {versions or 'none'}), or set the alias: "
                f"MlflowClient().set_registered_model_alias({name!r}, {alias!r}, <version>)"
            )
        version = str(aliases[alias])
    elif version == "latest":
        if not versions:
            raise ModelLoadError(f"{weights}: registered model {name!r} has no versions yet; register one first")
        version = str(versions[-1])
    elif not version.isdigit():
        raise ModelLoadError(f"{weights}: {version!r} is not a version number; write models:/{name}/<number> or "
                             f"models:/{name}@<alias> (registry stages are deprecated in MLflow: use an alias)")
    mv = _lookup(lambda: client.get_model_version(name, version), uri, weights)
    if mv is None:
        raise ModelLoadError(f"{weights}: registered model {name!r} has no version {version}; its versions: "
                             f"{versions or 'none'}. Pick one of them or an alias (models:/{name}@<alias>)")
    pinned = f"models:/{name}/{mv.version}"
    # MLflow resolves a models:/ download against its process-wide registry URI: ask ours where the files are.
    location = _lookup(lambda: client.get_model_version_download_uri(name, mv.version), uri, weights)
    path, sha, state = fetch(root, uri, pinned, weights, location)
    return ResolvedBase(weights, pinned, sha, path, "models", version=str(mv.version), run_id=mv.run_id or None,
                        arch=_arch_tag(dict(mv.tags or {})), _state=state)


@register_source("runs")
def resolve_runs(weights: str, root: Path, tracking_uri: str | None = None) -> ResolvedBase:
    """runs:/<run_id>/<artifact path>: an MLflow model folder, a weights file, or a folder holding one."""
    m = _RUNS.match(weights)
    if m is None:
        raise ModelLoadError(f"model.weights {weights!r} is not a run URI; write runs:/<run_id>/<artifact path>")
    run_id, apath = m["run"], m["path"].strip("/")
    uri = registry_uri(root, tracking_uri)
    client = client_for(uri, weights)
    if _lookup(lambda: client.get_run(run_id), uri, weights) is None:
        raise ModelLoadError(f"{weights}: no MLflow run {run_id!r} at {redact(uri)}; copy the run id from the "
                             "MLflow UI, or point MLFLOW_TRACKING_URI at the server that holds the run")
    parent = posixpath.dirname(apath)
    listed = _lookup(lambda: client.list_artifacts(run_id, parent or None), uri, weights) or []
    names = [f.path for f in listed]
    if apath not in names:
        raise ModelLoadError(f"{weights}: run {run_id} has no artifact {apath!r}; {parent or 'its root'} holds: "
                             f"{', '.join(names) or 'nothing'}. Fix the artifact path")
    pinned = f"runs:/{run_id}/{apath}"
    path, sha, state = fetch(root, uri, pinned, weights)
    return ResolvedBase(weights, pinned, sha, path, "runs", run_id=run_id, _state=state)
