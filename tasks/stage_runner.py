"""run_stage: one stage of one pipeline run. The stage (a `run(ctx, out)` module in tasks/stages/) reads
the outputs of earlier stages from the run folder, writes its own folder atomically, logs a child MLflow
run, and returns a small JSON-able dict.

run_stage is incremental: a stage whose fingerprint (tasks/fingerprint.py) matches an output already in
this run is skipped, one that matches another run's output reuses it (tasks/stage_cache.py).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

from tasks.errors import StageError
from tasks.stage_specs import STAGES, spec

__all__ = ["run_stage"]


def run_stage(
    stage: str,
    pipeline: str,
    run_id: str,
    *,
    config_path: str | os.PathLike | None = None,
    workspace: str | os.PathLike | None = None,
    airflow_run_id: str | None = None,
    force: bool | str | None = None,
) -> dict[str, Any]:
    """Run one stage of one pipeline run (or reuse its output); re-running replaces its output whole.

    force: True recomputes this stage; None follows the run's `force` in run.json (true, or a stage name:
    that stage and every later one).
    """
    from tasks import stage_cache, tracking
    from tasks.config import load_pipeline
    from tasks.context import StageContext
    from tasks.fingerprint import manifest
    from tasks.overrides import apply_overrides
    from tasks.progress import say
    from tasks.workspace import atomic_dir, run_paths

    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    cfg = load_pipeline(pipeline, config_path)
    paths = run_paths(pipeline, run_id, workspace)
    state = paths.read_state()
    for name in (*spec(stage).upstream, stage):  # with an object store: what this worker lacks of the run
        paths.pull(name)
    cfg = apply_overrides(cfg, state.get("overrides") or {})
    # TVM sizes its thread pool once per process, at its first kernel: use the benchmark's count.
    os.environ.setdefault("TVM_NUM_THREADS", str(cfg.benchmark.threads))
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    tags = {"airflow_run_id": airflow_run_id} if airflow_run_id else {}
    decision = stage_cache.decide(stage, cfg, paths, state, state.get("force") if force is None else force)
    if decision.action == "skip":
        say(f"{stage}: {decision.reason}: skipped")
        return {k: v for k, v in state["stages"][stage].items() if k not in ("inputs", "outputs")}
    t0 = time.time()
    if decision.action == "reuse":
        result, tr = stage_cache.reuse(stage, decision, paths, tags)
        outputs = manifest(paths.stage_dir(stage), decision.entry.get("outputs"))
    else:
        module = importlib.import_module(f"tasks.stages.{stage}")
        with tracking.stage_run(paths, stage, tags, reuse=stage == "search") as tr:  # a resumed study keeps its run
            ctx = StageContext(cfg=cfg, paths=paths, tracker=tr)
            with atomic_dir(paths.stage_dir(stage)) as out:
                result = module.run(ctx, Path(out))
            tr.tags({"shrinkflow.reused": "false", "shrinkflow.changed": decision.reason})
        result = {**result, "reused": False, "changed": decision.reason}
        outputs = manifest(paths.stage_dir(stage))
    paths.publish(stage, outputs)  # before run.json names it: a reader never meets a stage not yet there
    result = {"stage": stage, "pipeline": pipeline, "run_id": paths.run_id, **result}
    result["seconds"] = round(time.time() - t0, 2)
    tr.metrics({"stage_seconds": result["seconds"]})
    if decision.fp is not None:
        stage_cache.record(stage, paths, decision.fp, outputs, result)
    state = paths.read_state()
    stages = state.get("stages", {})
    stages[stage] = {**result, "fingerprint": decision.fp.digest if decision.fp else None,
                     "inputs": decision.fp.parts if decision.fp else None, "outputs": outputs}
    done = [s for s in STAGES if s in stages]  # run.json is written with sorted keys: keep the order here
    paths.update_state(pipeline=pipeline, run_id=paths.run_id, stages=stages, completed=done,
                       mlflow_parent_run=tr.parent_id)
    return result
