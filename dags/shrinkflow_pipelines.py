"""One Airflow DAG per pipeline in pipelines.yaml: `shrinkflow__<name>`, the stages chained in order.

Parsed every few seconds by the DAG processor, so the top of this file reads pipelines.yaml and
nothing more: torch, TVM, MLflow and tasks.stages are imported inside the tasks. An invalid
pipelines.yaml raises its ConfigError here, which Airflow shows as this file's import error.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import dag, task

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # A scheduler or worker that has the repo checked out but not pip-installed still finds `tasks`.
    sys.path.append(str(REPO_ROOT))

from tasks.config import PipelineConfig, load_pipelines, pipelines_path  # noqa: E402
from tasks.errors import ConfigError  # noqa: E402

# The same order as tasks.stages.STAGES (not imported here: parse time stays cheap);
# tests/dags/test_dag_structure.py keeps the two in step.
STAGES = ("prepare_data", "train_base", "search", "compress", "finetune", "compile", "benchmark", "register")
DAG_ID_PREFIX = "shrinkflow__"
# Fixed, in the past: with catchup off, a scheduled pipeline starts at its next interval.
START_DATE = datetime(2025, 1, 1, tzinfo=UTC)


def resolve_pipelines_file() -> Path:
    """$SHRINKFLOW_PIPELINES or pipelines.yaml; relative paths count from the repo root, not the cwd."""
    path = pipelines_path()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def _stage_task(stage: str, pipeline: str, config_path: str, trigger_rule: str = "all_success"):
    @task(task_id=stage, trigger_rule=trigger_rule)
    def run(shrinkflow_run_id: str, **context: Any) -> dict[str, Any]:
        from tasks.stages import run_stage

        return run_stage(
            stage, pipeline, shrinkflow_run_id, config_path=config_path, airflow_run_id=context["run_id"]
        )

    return run


def _search_fanout(pipeline: str, config_path: str, workers: int, run_id):
    """search_setup, then `workers` mapped search_worker tasks sharing one Optuna study (a server storage)."""

    @task(task_id="search_setup")
    def setup(shrinkflow_run_id: str) -> dict[str, Any]:
        from tasks.stages.search import setup as search_setup

        return search_setup(pipeline, shrinkflow_run_id, config_path=config_path)

    @task(task_id="search_worker")
    def worker(index: int, shrinkflow_run_id: str) -> dict[str, Any]:
        from tasks.stages.search import worker as search_worker

        return search_worker(pipeline, shrinkflow_run_id, index, config_path=config_path)

    first = setup(run_id)
    mapped = worker.partial(shrinkflow_run_id=run_id).expand(index=list(range(workers)))
    first >> mapped
    return first, mapped


def build_dag(name: str, cfg: PipelineConfig, config_path: Path):
    """The DAG of one pipeline: start (picks the run id), then every stage in order."""
    tags = ["shrinkflow", *(t for t in cfg.tags if t != "shrinkflow")]

    @dag(
        dag_id=f"{DAG_ID_PREFIX}{name}",
        schedule=cfg.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=tags,
        doc_md=f"### shrinkflow pipeline `{name}`\n\n{cfg.description.strip() or '(no description)'}\n\n"
        f'Declared in `{config_path}`. Trigger with conf `{{"run_id": "..."}}` to name or resume a run.',
        default_args={"retries": 0},
    )
    def pipeline_dag() -> None:
        @task
        def start(**context: Any) -> str:
            """The shrinkflow run id: conf["run_id"] if given, else the Airflow run id made folder-safe."""
            from tasks.workspace import sanitize_run_id

            conf = context["dag_run"].conf or {}
            return sanitize_run_id(str(conf.get("run_id") or context["run_id"]))

        run_id = start()
        previous = None
        fan_out = cfg.search.n_trials > 0 and cfg.search.workers > 1
        for stage in STAGES:
            if stage == "search" and fan_out:
                # Mapped workers share the study; the search stage then runs what budget is left,
                # waits for running trials and chooses the plan.
                first, mapped = _search_fanout(name, str(config_path), cfg.search.workers, run_id)
                previous >> first
                previous = mapped
            # After the fan-out the search runs even if a worker failed: it runs what that worker left.
            rule = "all_done" if stage == "search" and fan_out else "all_success"
            out = _stage_task(stage, name, str(config_path), rule)(run_id)
            if previous is not None:
                previous >> out
            previous = out

    return pipeline_dag()


_pipelines_file = resolve_pipelines_file()
try:
    _pipelines = load_pipelines(_pipelines_file)
except ConfigError as e:
    # Airflow shows this as the file's import error; the pydantic traceback behind it only repeats it.
    raise ConfigError(str(e)) from None
for _name, _cfg in _pipelines.items():
    build_dag(_name, _cfg, _pipelines_file)
