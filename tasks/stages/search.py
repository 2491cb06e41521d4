"""Stage 3: find the plan. Scans layer sensitivity, then, with search.n_trials > 0, runs (or resumes)
the Optuna study and chooses the plan; with no search, the plan is pipelines.yaml's, goal-solved.

Airflow fans the trials out to mapped worker tasks (`setup`, `worker`) that share the study; this
stage then runs whatever budget is left, waits for running trials, and chooses.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.context import StageContext
from tasks.progress import say
from tasks.workspace import RunPaths, write_json


def _log_sensitivity(ctx: StageContext, out: Path) -> None:
    from tasks.search.runner import shared_dir

    for name in ("sensitivity.json", "sensitivity.png"):
        src = shared_dir(ctx.paths) / name
        if src.is_file():
            shutil.copy2(src, out / name)
            ctx.tracker.artifact(out / name)


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    from tasks.search import runner

    cfg = ctx.cfg
    if cfg.search.n_trials == 0:
        return _no_search(ctx, out)
    session = runner.prepare(cfg, ctx.paths)
    say(f"search: {cfg.search.n_trials} trials, sampler {cfg.search.sampler}, "
        f"{len(session.space.searched)} parameters, study {session.study.study_name}")
    ran = runner.finish(session)  # the budget left, then what dead workers left
    choice = runner.summarize(session, out)
    _log_sensitivity(ctx, out)
    rows_done = sum(1 for t in session.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")
    m = choice["metrics"]
    if not ctx.tracker.client.get_run(ctx.tracker.run_id).data.params:  # a resumed run keeps its first params
        ctx.tracker.params({"search": cfg.search.model_dump(exclude={"space"}), "search_space": choice["space"]})
    ctx.tracker.tags({"chosen_trial": str(choice["trial"])})
    ctx.tracker.metrics({"trials_completed": rows_done, "trials_run_here": ran, "chosen_trial": choice["trial"],
                         "chosen_feasible": float(choice["feasible"]),
                         **{f"chosen.{k}": v for k, v in m.items() if isinstance(v, int | float)}})
    ctx.tracker.tags({"search_goal_met": str(choice["feasible"]).lower()}, on_parent=True)
    for name in ("pareto.png", "efficiency.png", "trials.csv", "plan.json", "choice.json"):
        ctx.tracker.artifact(out / name)
        ctx.tracker.artifact(out / name, "search", on_parent=True)
    verdict = "meets the goal's cost limits" if choice["feasible"] else "does NOT meet the goal"
    say(f"search: chose trial {choice['trial']} ({choice['why']}); val {m.get('val_accuracy', float('nan')):.2f}%, "
        f"{m.get('macs_reduction', float('nan')):.2f}x fewer MACs, {m.get('size_mb', float('nan')):.3f} MB: {verdict}")
    if not choice["feasible"]:
        say("search: the full fine-tune goes ahead with the closest plan; its goal check will say NOT met",
            logging.WARNING)
    return {"searched": True, "chosen_trial": choice["trial"], "feasible": choice["feasible"], "trials": rows_done}


def _no_search(ctx: StageContext, out: Path) -> dict[str, Any]:
    from tasks.plan import plan_from_config, plan_to_json
    from tasks.search.runner import load_or_scan_sensitivity

    plan_json = plan_to_json(plan_from_config(ctx.cfg))  # a bad plan fails here, before the scan
    base, _ = ctx.model("train_base")
    load_or_scan_sensitivity(ctx.cfg, ctx.paths, base, ctx.splits())
    _log_sensitivity(ctx, out)
    write_json(out / "plan.json", plan_json)
    write_json(out / "choice.json", {"trial": None, "why": "no search (search.n_trials: 0): the plan in pipelines.yaml",
                                     "plan": plan_json, "finetune": {"lr": ctx.cfg.finetune.lr}})
    ctx.tracker.artifact(out / "plan.json")
    return {"searched": False}


# --- the fan-out: called by Airflow's mapped tasks (dags/) and `shrinkflow search-worker` -------------

def _load(pipeline: str, run_id: str, config_path, workspace) -> tuple[PipelineConfig, RunPaths]:
    from tasks.overrides import run_config
    from tasks.stage_specs import spec
    from tasks.workspace import run_paths

    paths = run_paths(pipeline, run_id, workspace)  # the run's overrides apply here as in run_stage
    state = paths.read_state()
    for name in spec("search").upstream:  # a worker with no shared disk pulls what the trials read
        paths.pull(name)
    return run_config(pipeline, state, config_path), paths


def setup(pipeline: str, run_id: str, *, config_path=None, workspace=None) -> dict[str, Any]:
    """Before the workers: scan sensitivity, create the study and the search's MLflow run, queue warm starts."""
    from tasks.search import runner
    from tasks.stage_cache import stage_is_current

    if stage_is_current("search", pipeline, run_id, config_path=config_path, workspace=workspace):
        return {"study": None, "reused": True}  # the search stage will reuse its output: no study to run
    cfg, paths = _load(pipeline, run_id, config_path, workspace)
    if cfg.search.n_trials == 0:
        return {"study": None}
    s = runner.prepare(cfg, paths)
    return {"study": s.study.study_name, "parameters": len(s.space.searched)}


def worker(pipeline: str, run_id: str, index: int, *, config_path=None, workspace=None,
           max_trials: int | None = None) -> dict[str, Any]:
    """One worker: run trials of the shared study until the budget or its share is spent."""
    import math

    from tasks.search import runner
    from tasks.stage_cache import stage_is_current

    if stage_is_current("search", pipeline, run_id, config_path=config_path, workspace=workspace):
        return {"worker": index, "trials": 0, "reused": True}
    cfg, paths = _load(pipeline, run_id, config_path, workspace)
    if cfg.search.n_trials == 0:
        return {"worker": index, "trials": 0}
    s = runner.prepare(cfg, paths, worker=index)
    share = max_trials if max_trials is not None else math.ceil(cfg.search.n_trials / cfg.search.workers)
    n = runner.work(s, max_trials=share)
    return {"worker": index, "trials": n}
