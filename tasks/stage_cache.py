"""Incremental runs: decide whether a stage runs, is already done in this run, or reuses another run's output.

The index `<workspace>/cache/stages/<stage>/<fingerprint>.json` maps a fingerprint (tasks/fingerprint.py)
to the runs whose stage folder holds that output, with the output's manifest. A reused output is
materialised in this run by hard links (a copy where linking fails), atomically. A source folder that is
gone or no longer matches its manifest is a cache miss, never an error.

Stages whose output is not a pure function of their inputs are reused all the same when the inputs
are unchanged, which is the point of a nightly run: compile's TVM tuning database (.shrinkflow/tuning)
only grows, and reusing a compiled library is reusing its tuned kernels; benchmark timings are the
previous measurement of the same artifacts; the search's Optuna study (keyed by run id) is not copied,
only its chosen plan; register keeps the champion as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.fingerprint import Fingerprint, explain, fingerprint, manifest
from tasks.frontier import frontier_point
from tasks.stage_specs import STAGES, downstream, spec
from tasks.workspace import RunPaths, atomic_dir, read_json, write_json

Force = bool | str | None


def is_forced(stage: str, force: Force) -> bool:
    """force true: every stage; force '<stage>': that stage and every later one."""
    if force is True:
        return True
    return isinstance(force, str) and force in STAGES and stage in downstream(force)


def index_dir(root: Path, stage: str) -> Path:
    return root / "cache" / "stages" / stage


def _index(root: Path, stage: str, name: str) -> Path:
    """An index file; with an object store, the published one is fetched over the local copy first."""
    from tasks.object_store import current

    path = index_dir(root, stage) / name
    if (store := current()) is not None:
        data = store.get_bytes(f"cache/stages/{stage}/{name}")
        if data is not None:
            write_json(path, json.loads(data))
    return path


def _write_index(root: Path, stage: str, name: str, obj: dict[str, Any]) -> None:
    from tasks.object_store import current

    path = index_dir(root, stage) / name
    write_json(path, obj)
    if (store := current()) is not None:
        store.put_bytes(f"cache/stages/{stage}/{name}", path.read_bytes())


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def upstream_digests(stage: str, paths: RunPaths, state: dict[str, Any]) -> dict[str, str] | None:
    """The content digest of each upstream stage's output in this run; None if one has no recorded output."""
    out = {}
    for up in spec(stage).upstream:
        rec = state.get("stages", {}).get(up)
        folder = paths.stage_dir(up)
        if not rec or not folder.is_dir():
            return None
        # Checked against the folder by size and mtime (hashing only what changed): edits on disk count.
        out[up] = manifest(folder, rec.get("outputs"))["digest"]
    return out


@dataclass
class Decision:
    """What run_stage does with a stage: 'run' it, 'skip' it (done in this run), or 'reuse' another run's."""

    action: str
    reason: str
    fp: Fingerprint | None = None
    source: RunPaths | None = None
    entry: dict[str, Any] = field(default_factory=dict)


def _intact(folder: Path, outputs: dict[str, Any] | None) -> bool:
    return bool(outputs) and folder.is_dir() and manifest(folder, outputs)["digest"] == outputs["digest"]


def _latest(root: Path, stage: str, pipeline: str) -> dict[str, Any] | None:
    return _read(_index(root, stage, f"latest-{pipeline}.json"))


def _source_name(src: RunPaths, paths: RunPaths) -> str:
    return src.run_id if src.pipeline == paths.pipeline else f"{src.pipeline}/{src.run_id}"


def decide(stage: str, cfg: PipelineConfig, paths: RunPaths, state: dict[str, Any], force: Force) -> Decision:
    """Run, skip or reuse: by the stage's fingerprint against this run's record, then the workspace index."""
    ups = upstream_digests(stage, paths, state)
    if ups is None:  # an upstream stage has not run: the stage itself says which, clearly
        return Decision("run", "upstream not run")
    fp = fingerprint(stage, cfg, paths.root, ups, registry_point=frontier_point(state))
    mine = state.get("stages", {}).get(stage)
    if is_forced(stage, force):
        return Decision("run", "forced", fp)
    if mine and mine.get("fingerprint") == fp.digest and _intact(paths.stage_dir(stage), mine.get("outputs")):
        return Decision("skip", "done earlier in this run; inputs, config and code unchanged", fp)
    entry = None if fp.volatile else _read(_index(paths.root, stage, f"{fp.digest}.json"))
    for r in (entry or {}).get("runs", []):
        src = RunPaths(paths.root, r["pipeline"], r["run_id"])
        src.pull(stage)  # with an object store: that run's output, if this worker lacks it
        if src.run_dir != paths.run_dir and _intact(src.stage_dir(stage), entry.get("outputs")):
            why = f"inputs, config and code unchanged since run {_source_name(src, paths)}"
            if stage == "register":
                why = f"nothing changed since run {_source_name(src, paths)}; the champion stays"
            return Decision("reuse", why, fp, src, entry)
    before = mine.get("inputs") if mine else (_latest(paths.root, stage, paths.pipeline) or {}).get("parts")
    reason = explain(fp.parts, before)
    if entry and reason.startswith("inputs unchanged"):
        reason = "inputs unchanged, but the earlier output is gone (deleted or modified)"
    return Decision("run", reason, fp)


def record(stage: str, paths: RunPaths, fp: Fingerprint, outputs: dict[str, Any], result: dict[str, Any]) -> None:
    """Add this run's output to the index under its fingerprint (newest first)."""
    if fp.volatile:
        return
    entry = _read(_index(paths.root, stage, f"{fp.digest}.json")) or {}
    if entry.get("outputs", {}).get("digest") != outputs["digest"]:
        entry = {}  # the same inputs gave another output (timings, a re-run): this run's is the reference now
    me = {"pipeline": paths.pipeline, "run_id": paths.run_id}
    runs = [me] + [r for r in entry.get("runs", []) if r != me]
    keep = {k: v for k, v in result.items() if k not in ("reused", "reused_from", "reason", "changed", "seconds")}
    new = {"stage": stage, "fingerprint": fp.digest, "parts": fp.parts, "outputs": outputs,
           "result": entry.get("result", keep), "runs": runs, "updated": time.time()}
    _write_index(paths.root, stage, f"{fp.digest}.json", new)
    _write_index(paths.root, stage, f"latest-{paths.pipeline}.json", {"fingerprint": fp.digest, "parts": fp.parts})


def _link_tree(src: Path, dest: Path) -> None:
    """Hard-link every file of src under dest (copy where linking fails: another file system)."""
    for dirpath, _dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in filenames:
            s, t = Path(dirpath) / f, dest / rel / f
            if s.is_symlink():
                os.symlink(os.readlink(s), t)
                continue
            try:
                os.link(s, t)
            except OSError:
                shutil.copy2(s, t)


def _metrics(folder: Path, result: dict[str, Any]) -> dict[str, float]:
    numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    m = folder / "metrics.json"
    if m.is_file():
        data = _read(m) or {}
        numbers.update({k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return numbers


def reuse(stage: str, decision: Decision, paths: RunPaths, tags: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """Materialise the source's output here and log a child MLflow run marked as reused; (result, tracker)."""
    from tasks import tracking
    from tasks.progress import say

    assert decision.source is not None
    src_dir = decision.source.stage_dir(stage)
    with atomic_dir(paths.stage_dir(stage)) as out:
        _link_tree(src_dir, Path(out))
    result = dict(decision.entry.get("result") or {})
    if "reason" in result:
        result["source_reason"] = result.pop("reason")
    source = _source_name(decision.source, paths)
    result.update(reused=True, reused_from=source, reason=decision.reason)
    with tracking.stage_run(paths, stage, tags, reuse=stage == "search") as tr:
        tr.tags({"shrinkflow.reused": "true", "shrinkflow.reused_from": source, "shrinkflow.reuse_reason": decision.reason})
        tr.metrics(_metrics(paths.stage_dir(stage), result))
        if stage == "register":
            tr.tags({"shrinkflow.outcome": decision.reason}, on_parent=True)
    if stage == "register":
        tracking.finish_parent(paths)  # the register stage closes the run, reused or not
    say(f"{stage}: reused from run {source} ({decision.reason})")
    return result, tr


def stage_is_current(stage: str, pipeline: str, run_id: str, *, config_path: Any = None,
                     workspace: Any = None) -> bool:
    """True when run_stage would not compute the stage: done in this run, or reusable from another run."""
    from tasks.overrides import run_config
    from tasks.workspace import run_paths

    paths = run_paths(pipeline, run_id, workspace)
    state = paths.read_state()
    cfg = run_config(pipeline, state, config_path)
    return decide(stage, cfg, paths, state, state.get("force")).action in ("skip", "reuse")
