"""The object-store workspace: for workers with no shared disk, `SHRINKFLOW_ARTIFACTS=s3://bucket/prefix`
(any fsspec URL: s3://, gs://, file://). Each worker's local workspace ($SHRINKFLOW_HOME) is then a cache:
a stage pulls the folders of the upstream stages it reads, writes its own folder atomically as on one
machine, then publishes it.

Layout under the prefix:
    blobs/<sha256>                                   file contents, content-addressed: uploaded once ever
    runs/<pipeline>/<run_id>/<folder>.manifest.json  a published folder: {relpath: {sha256, size, mtime_ns}}
    runs/<pipeline>/<run_id>/run.json                the run's state (stages, lineage, overrides)
    cache/...                                        the incremental-run index (tasks/stage_cache.py)

Publishing uploads each blob the store lacks to tmp/<uuid> and moves it into blobs/, then writes the
manifest in one PUT, last: a reader sees the previous folder or the whole new one, never half of one.
A pull links files from a local blob cache (<workspace>/cache/blobs), so a folder already pulled, or
files seen before in any run, cost no download.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError, ServiceError

ENV = "SHRINKFLOW_ARTIFACTS"
TIMEOUT_S = 10


def url() -> str | None:
    """The object store's URL ($SHRINKFLOW_ARTIFACTS), or None: the workspace is a local or shared folder."""
    return os.environ.get(ENV, "").strip() or None


def current() -> ObjectStore | None:
    """The object store this process publishes to, or None."""
    u = url()
    return _store(u) if u else None


@functools.cache
def _store(u: str) -> ObjectStore:
    return ObjectStore(u)


def _fix(u: str) -> str:
    return (f"Check ${ENV} ({u}), the endpoint ($AWS_ENDPOINT_URL) and the credentials, or unset ${ENV} "
            "to keep the workspace in local folders")


class ObjectStore:
    """Blobs and manifests under one prefix of an fsspec file system."""

    def __init__(self, u: str) -> None:
        import fsspec

        self.url = u.rstrip("/")
        opts: dict[str, Any] = {}
        if self.url.startswith("s3://"):
            # Bounded: an unreachable endpoint is an error in seconds, not a hang.
            opts = {"config_kwargs": {"connect_timeout": TIMEOUT_S, "read_timeout": 60,
                                      "retries": {"max_attempts": 3, "mode": "standard"}},
                    "skip_instance_cache": True}
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                opts["client_kwargs"] = {"endpoint_url": endpoint}
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url, **opts)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"${ENV}={self.url!r} is not a usable object-store URL ({e}). "
                              "Give s3://bucket/prefix (s3fs) or file:///path") from None
        self.base = self.base.rstrip("/")

    def __repr__(self) -> str:
        return f"ObjectStore({self.url})"

    # --- keys --------------------------------------------------------------------------------------
    def key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    @staticmethod
    def run_rel(pipeline: str, run_id: str, name: str) -> str:
        return f"runs/{pipeline}/{run_id}/{name}"

    # --- bytes, with errors that name the store ----------------------------------------------------
    def _call(self, what: str, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise ConfigError(f"object store {self.url} refused {what}: {e}. {_fix(self.url)}") from None
        except OSError as e:
            # botocore's connection errors arrive as OSError subclasses (or wrapped by s3fs as OSError).
            raise ServiceError(f"object store {self.url}: {what} failed: {_reason(e)}. {_fix(self.url)}") from None
        except Exception as e:  # botocore's EndpointConnectionError and friends are not OSErrors
            if type(e).__module__.startswith(("botocore", "aiobotocore", "urllib3", "aiohttp")):
                raise ServiceError(f"object store {self.url}: {what} failed: {_reason(e)}. {_fix(self.url)}"
                                   ) from None
            raise

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            return self._call(f"reading {rel}", self.fs.cat_file, self.key(rel))
        except FileNotFoundError:
            return None

    def put_bytes(self, rel: str, data: bytes) -> None:
        """One object, whole or not at all: an S3 PUT is atomic; elsewhere a temporary key is moved in."""
        if self.url.startswith("s3://"):
            self._call(f"writing {rel}", self.fs.pipe_file, self.key(rel), data)
            return
        tmp = self.key(f"tmp/{uuid.uuid4().hex}")
        self._call(f"writing {rel}", self.fs.pipe_file, tmp, data)
        self._call(f"writing {rel}", self.fs.mv, tmp, self.key(rel))

    def exists(self, rel: str) -> bool:
        return bool(self._call(f"looking up {rel}", self.fs.exists, self.key(rel)))

    def check(self) -> str:
        """Write, read and delete one small object; a clear error when the store cannot be used."""
        probe = f"tmp/check-{uuid.uuid4().hex}"
        bucket = self.base.split("/", 1)[0]
        try:
            self.put_bytes(probe, b"ok")  # ServiceError / ConfigError (refused) pass through as they are
        except FileNotFoundError:
            raise ConfigError(f"object store {self.url}: bucket {bucket!r} does not exist. Create it (e.g. "
                              f"`aws s3 mb s3://{bucket}`), or fix ${ENV}") from None
        if self.get_bytes(probe) != b"ok":
            raise ServiceError(f"object store {self.url}: an object written was not read back. {_fix(self.url)}")
        with contextlib.suppress(Exception):
            self.fs.rm_file(self.key(probe))
        return f"object store {self.url}: writable"

    # --- folders -----------------------------------------------------------------------------------
    def publish(self, folder: Path, rel: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload the blobs `folder` needs, then commit its manifest at `rel`.manifest.json (last)."""
        from tasks.fingerprint import manifest as folder_manifest

        m = manifest if manifest is not None else folder_manifest(folder)
        for relpath, info in m["files"].items():
            blob = f"blobs/{info['sha256']}"
            if self.exists(blob):
                continue  # content-addressed: this exact file was published before, by any run
            tmp = self.key(f"tmp/{uuid.uuid4().hex}")
            self._call(f"uploading {relpath}", self.fs.put_file, str(folder / relpath), tmp)
            self._call(f"uploading {relpath}", self.fs.mv, tmp, self.key(blob))
        record = {"digest": m["digest"], "files": m["files"], "published_at": time.time(),
                  "published_by": worker_name()}
        self.put_bytes(f"{rel}.manifest.json", json.dumps(record, sort_keys=True).encode())
        return record

    def manifest(self, rel: str) -> dict[str, Any] | None:
        data = self.get_bytes(f"{rel}.manifest.json")
        return json.loads(data) if data is not None else None

    def pull(self, rel: str, dest: Path, blobs: Path) -> bool:
        """Make `dest` hold the published folder `rel` (links from the blob cache); False if none is published.

        A local folder that already matches the manifest is left alone; otherwise it is replaced whole.
        """
        from tasks.fingerprint import manifest as folder_manifest
        from tasks.workspace import atomic_dir

        m = self.manifest(rel)
        if m is None:
            return False
        if dest.is_dir() and folder_manifest(dest, m)["digest"] == m["digest"]:
            return True
        blobs.mkdir(parents=True, exist_ok=True)
        for relpath, info in m["files"].items():
            self._fetch_blob(info["sha256"], blobs, relpath)
        with atomic_dir(dest) as out:
            for relpath, info in m["files"].items():
                target = Path(out) / relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blobs / info["sha256"], target)
                except OSError:
                    import shutil

                    shutil.copy2(blobs / info["sha256"], target)
                # The publisher's mtime: the next manifest() of this folder trusts it instead of re-hashing.
                os.utime(target, ns=(info["mtime_ns"], info["mtime_ns"]))
        return True

    def _fetch_blob(self, sha: str, blobs: Path, relpath: str) -> None:
        from tasks.fingerprint import file_sha256

        final = blobs / sha
        if final.is_file():
            return
        fd, tmp = tempfile.mkstemp(dir=blobs, prefix=f".{sha[:12]}.", suffix=".tmp")
        os.close(fd)
        try:
            try:
                self._call(f"downloading {relpath}", self.fs.get_file, self.key(f"blobs/{sha}"), tmp)
            except FileNotFoundError:
                raise ServiceError(f"object store {self.url}: blob {sha[:12]} of {relpath} is missing although a "
                                   "manifest names it (deleted by hand?); re-run the stage that wrote it") from None
            if file_sha256(Path(tmp)) != sha:
                raise ServiceError(f"object store {self.url}: {relpath} (blob {sha[:12]}) arrived corrupt; "
                                   "the stage will be retried")
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def worker_name() -> str:
    """This worker's name: $SHRINKFLOW_WORKER_NAME, else the host name."""
    import socket

    return os.environ.get("SHRINKFLOW_WORKER_NAME") or socket.getfqdn()
