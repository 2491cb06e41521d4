"""Stage fingerprints: a sha256 over what a stage consumes (tasks/stage_specs.py), and output manifests.

The idea is DVC's, and so is the file hashing: a stage is up to date when the hashes of its deps
(upstream outputs, external inputs, code) and of its params (config sections) match the ones recorded
with its output. An output folder is summarised as DVC summarises a directory (its `.dir` object): a
manifest relative path -> content hash, hashed again into one digest. Files are hashed with dvc_data's
chunked hasher (`file_md5(name="sha256")`), and, as DVC's state database does, a file whose size and
mtime match its manifest entry is not read again. We do not run DVC's own object cache beside the run
folders: it would keep a second copy of every model and compiled library (or turn the run folders into
links into it), and `dvc repro` decides per workspace, not per run id, Airflow task and reused run.
The run folders are the cache; tasks/stage_cache.py indexes them by fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.stage_specs import spec

REPO_ROOT = Path(__file__).resolve().parent.parent
FORMAT = 1  # bump when what goes into a fingerprint changes: every stored fingerprint then misses

_EXTERNAL_WHAT = {"data": "data", "base_weights": "base model weights", "model_factory": "model factory code",
                  "model_files": "model files (transformers folder or .pt2)", "devices": "device registry entry"}


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """Content hash of one file, by DVC's hasher."""
    from dvc_data.hashfile.hash import file_md5

    return file_md5(str(path), name="sha256")


def _files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.endswith(".pyc")]
    return out


def manifest(folder: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"digest", "files": {relpath: {sha256, size, mtime_ns}}} of a folder; unchanged files (size and mtime
    as in `previous`) keep their recorded hash."""
    known = (previous or {}).get("files", {})
    files: dict[str, dict[str, Any]] = {}
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        st = p.stat()
        old = known.get(rel)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            sha = old["sha256"]
        else:
            sha = file_sha256(p)
        files[rel] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"digest": _json_digest({k: v["sha256"] for k, v in files.items()}), "files": files}


def path_digest(rel: str, root: Path = REPO_ROOT) -> str:
    """Hash of the files under one code path (a file or a folder; __pycache__ ignored)."""
    p = root / rel
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        return "missing"
    return _json_digest({f.relative_to(p).as_posix(): file_sha256(f) for f in _files(p)})


def code_version(paths: tuple[str, ...]) -> dict[str, str]:
    """Per code path, the hash of its files: the stage's code version."""
    return {rel: path_digest(rel) for rel in paths}


def config_parts(cfg: PipelineConfig, sections: tuple[str, ...]) -> dict[str, str]:
    dumped = cfg.model_dump(mode="json")
    return {s: _json_digest(dumped.get(s)) for s in sections}


def data_identity(cfg: PipelineConfig) -> str | None:
    """The raw data source's identity, or None when it has none (it is then prepared again every run)."""
    d = cfg.data
    if d.source == "synthetic":
        return "synthetic: the config is the data"
    if d.source == "fashion_mnist":
        from tasks.data.sources import FASHION_DIR

        root = Path(d.path).expanduser() if d.path else FASHION_DIR
        names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
        return _json_digest({n: file_sha256(root / n) if (root / n).is_file() else None for n in names})
    if d.source == "digits":
        import sklearn

        f = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
        return _json_digest({"sklearn": sklearn.__version__, "file": file_sha256(f) if f.is_file() else None})
    if d.source == "image_folder" and d.path:
        root = Path(d.path).expanduser()
        if not root.is_dir():
            return None
        listing = {}
        for f in _files(root):
            st = f.stat()
            listing[f.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
        return _json_digest(listing)
    return None  # a user-registered source: no way to tell that it is unchanged


def weights_identity(cfg: PipelineConfig, workspace: Path) -> str | None:
    """The base weights' identity (model.weights): a file's sha256, or a registry version and its sha256."""
    w = cfg.model.weights
    if w.startswith(("models:/", "runs:/")):
        from tasks.models.sources import resolve_base

        base = resolve_base(cfg.model, workspace)
        return f"{base.resolved}@{base.sha256}"
    p = Path(w).expanduser()
    return file_sha256(p) if p.is_file() else None


def factory_identity(factory: str) -> str | None:
    """The source of a user model factory's module ('pkg.mod:fn'), hashed; None when it cannot be found."""
    try:
        found = importlib.util.find_spec(factory.partition(":")[0])
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin or not Path(found.origin).is_file():
        return None
    return file_sha256(Path(found.origin))


def model_files_identity(spec: str) -> str | None:
    """A model source that holds its weights: the .pt2's hash, or the digest of the transformers folder's files
    (config and weights); None when it is missing (the stage then reports it)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return file_sha256(p)
    return manifest(p)["digest"] if p.is_dir() else None


def external_parts(stage: str, cfg: PipelineConfig, workspace: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in spec(stage).external:
        if name == "data":
            out["data"] = data_identity(cfg)
        elif name == "base_model":
            if cfg.model.weights:
                out["base_weights"] = weights_identity(cfg, workspace)
            if cfg.model.factory:
                out["model_factory"] = factory_identity(cfg.model.factory)
            if cfg.model.brings_weights():
                out["model_files"] = model_files_identity(cfg.model.exported or str(cfg.model.transformers))
        elif name == "devices":
            from tasks.devices import get_device
            from tasks.errors import ConfigError

            try:
                out["devices"] = _json_digest({t: get_device(t).model_dump(mode="json") for t in cfg.targets})
            except ConfigError:
                out["devices"] = None  # the stage itself reports the unknown target
    return out


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    parts: dict[str, Any]

    @property
    def volatile(self) -> bool:
        """An input without an identity: the stage cannot be proven unchanged."""
        return any(v is None for v in self.parts["external"].values())


def fingerprint(stage: str, cfg: PipelineConfig, workspace: Path, upstream: dict[str, str],
                registry_point: str | None = None) -> Fingerprint:
    """The stage's fingerprint from its config sections, upstream output digests, code and external inputs.
    A per-pipeline stage (register) of a frontier point run also keys on the point: it registers as the
    point's own model, so it never reuses a plain run's registration of the same model."""
    s = spec(stage)
    parts: dict[str, Any] = {
        "config": config_parts(cfg, s.sections),
        "upstream": {u: upstream[u] for u in s.upstream},
        "code": code_version(s.code),
        "external": external_parts(stage, cfg, workspace),
    }
    if s.per_pipeline:
        parts["pipeline"] = cfg.name
        if registry_point:
            parts["frontier_point"] = registry_point
    fp = Fingerprint(_json_digest({"format": FORMAT, "stage": stage, "parts": parts}), parts)
    if fp.volatile:  # never matches a stored one
        return Fingerprint(f"volatile-{uuid.uuid4().hex}", parts)
    return fp


def explain(new: dict[str, Any], old: dict[str, Any] | None) -> str:
    """What changed between two fingerprints' parts, in words ('config section goal changed', ...)."""
    if old is None:
        return "no earlier output"
    changes: list[str] = []
    missing = [k for k, v in new["external"].items() if v is None]
    changes += [f"{_EXTERNAL_WHAT.get(k, k)} has no identity to compare (recomputed each run)" for k in missing]
    for k, v in new["external"].items():
        if v is not None and old.get("external", {}).get(k) != v:
            changes.append(f"{_EXTERNAL_WHAT.get(k, k)} changed")
    if new.get("pipeline") != old.get("pipeline"):
        changes.append("another pipeline")
    for group, fmt in (("config", "config section {} changed"), ("upstream", "upstream {} changed"),
                       ("code", "code of {} changed")):
        before = old.get(group, {})
        changes += [fmt.format(k) for k, v in new[group].items() if before.get(k) != v]
    return "; ".join(changes) or "inputs unchanged, but the earlier output is gone"
