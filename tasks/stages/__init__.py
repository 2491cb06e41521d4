"""The pipeline's stages as plain functions. Each reads the outputs of earlier stages from the run folder,
writes its own folder atomically, logs a child MLflow run, and returns a small JSON-able dict."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

from tasks.errors import StageError

STAGES = ("prepare_data", "train_base", "search", "compress", "finetune", "compile", "benchmark", "register")


def run_stage(
    stage: str,
    pipeline: str,
    run_id: str,
    *,
    config_path: str | os.PathLike | None = None,
    workspace: str | os.PathLike | None = None,
    airflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Run one stage of one pipeline run; re-running replaces that stage's output whole."""
    from tasks import tracking
    from tasks.config import load_pipeline
    from tasks.stages.context import StageContext
    from tasks.workspace import atomic_dir, run_paths

    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    cfg = load_pipeline(pipeline, config_path)
    # TVM sizes its thread pool once per process, at its first kernel: use the benchmark's count.
    os.environ.setdefault("TVM_NUM_THREADS", str(cfg.benchmark.threads))
    paths = run_paths(pipeline, run_id, workspace)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    tags = {"airflow_run_id": airflow_run_id} if airflow_run_id else {}
    module = importlib.import_module(f"tasks.stages.{stage}")
    t0 = time.time()
    with tracking.stage_run(paths, stage, tags, reuse=stage == "search") as tr:  # a resumed study keeps its run
        ctx = StageContext(cfg=cfg, paths=paths, tracker=tr)
        with atomic_dir(paths.stage_dir(stage)) as out:
            result = module.run(ctx, Path(out))
        result = {"stage": stage, "pipeline": pipeline, "run_id": paths.run_id, **result}
        result["seconds"] = round(time.time() - t0, 2)
        tr.metrics({"stage_seconds": result["seconds"]})
    state = paths.read_state()
    stages = state.get("stages", {})
    stages[stage] = result
    done = [s for s in STAGES if s in stages]  # run.json is written with sorted keys: keep the order here
    paths.update_state(pipeline=pipeline, run_id=paths.run_id, stages=stages, completed=done,
                       mlflow_parent_run=tr.parent_id)
    return result
