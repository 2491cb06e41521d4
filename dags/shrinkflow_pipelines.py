"""One Airflow DAG per pipeline in pipelines.yaml: `shrinkflow__<name>`, the stages chained in order.

Parsed every few seconds by the DAG processor, so the top of this file reads pipelines.yaml and
nothing more: torch, TVM, MLflow and tasks.stages are imported inside the tasks. An invalid
pipelines.yaml raises its ConfigError here, which Airflow shows as this file's import error.

Each DAG: the pipeline's schedule (cron, preset, or an Asset such as a registry alias), created
paused; trigger params (goal, base model, run id, force) whose schemas come from the pipeline
schema; retries with backoff for transient failures, none for errors that only a fix can cure.
A pipeline with goal.frontier gets, after the data and the base, one task group per point (its own
point run of the remaining stages, tasks/frontier.py) and a final `frontier` task that collects them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, Param, TaskGroup, dag, task
from airflow.sdk.exceptions import AirflowFailException

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # A scheduler or worker that has the repo checked out but not pip-installed still finds `tasks`.
    sys.path.append(str(REPO_ROOT))

from tasks.config import PipelineConfig, load_pipelines, pipelines_path  # noqa: E402
from tasks.errors import ConfigError, ShrinkflowError, is_transient  # noqa: E402
from tasks.frontier import point_group_id  # noqa: E402  (light: names only)
from tasks.run_params import param_specs  # noqa: E402
from tasks.schedules import AssetSchedule  # noqa: E402
from tasks.stage_specs import STAGES  # noqa: E402  (light: the one declaration of the stage order)

DAG_ID_PREFIX = "shrinkflow__"
# Fixed, in the past: with catchup off, a scheduled pipeline starts at its next interval.
START_DATE = datetime(2025, 1, 1, tzinfo=UTC)
# Transient failures (device, MLflow, database unreachable) are retried after 30 s, 60 s, ... (at most
# 10 min). `shrinkflow run` sets SHRINKFLOW_TASK_RETRIES=0 (see tasks/orchestrate.py): at a terminal
# the run fails at once and says how to resume.
RETRIES_ENV, RETRY_DELAY_ENV = "SHRINKFLOW_TASK_RETRIES", "SHRINKFLOW_RETRY_DELAY_S"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    if not raw.strip().isdigit():
        raise ConfigError(f"${name}={raw!r} is not a whole number of at least 0; unset it or give e.g. {default}")
    return int(raw)


def task_defaults() -> dict[str, Any]:
    """default_args of every task: retries with exponential backoff (for what is worth retrying)."""
    return {
        "retries": _env_int(RETRIES_ENV, 2),
        "retry_delay": timedelta(seconds=_env_int(RETRY_DELAY_ENV, 30)),
        "retry_exponential_backoff": 2.0,  # a multiplier since Airflow 3.2; truthy (on) before it
        "max_retry_delay": timedelta(minutes=10),
    }


def run_classified(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call a tasks/ function; our errors that a retry cannot fix (bad config, data) fail at once.

    A TransientError, or an error caused by a service that did not answer, is raised as it is, so
    Airflow retries it; so is any other exception (Airflow's default).
    """
    try:
        return fn(*args, **kwargs)
    except ShrinkflowError as e:
        if is_transient(e):
            raise
        raise AirflowFailException(f"{type(e).__name__}: {e}\n(not retried: fix the cause, then clear the task)") from e


def dag_schedule(cfg: PipelineConfig) -> Any:
    """The DAG's schedule: None, a cron expression or preset, or [Asset] for an asset schedule."""
    if isinstance(cfg.schedule, AssetSchedule):
        return [Asset(name=cfg.schedule.name, uri=cfg.schedule.uri)]
    return cfg.schedule


def dag_params(cfg: PipelineConfig) -> dict[str, Param]:
    """The trigger form: one Param per trigger parameter, its JSON schema derived from the pipeline schema."""
    params = {}
    for name, spec in param_specs(cfg, STAGES).items():
        spec = dict(spec)
        params[name] = Param(spec.pop("default"), description=spec.pop("description", None), **spec)
    return params


def resolve_pipelines_file() -> Path:
    """$SHRINKFLOW_PIPELINES or pipelines.yaml; relative paths count from the repo root, not the cwd."""
    path = pipelines_path()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def _stage_task(stage: str, pipeline: str, config_path: str, trigger_rule: str = "all_success"):
    @task(task_id=stage, trigger_rule=trigger_rule)
    def run(shrinkflow_run_id: str, **context: Any) -> dict[str, Any]:
        from tasks.stage_runner import run_stage

        return run_classified(
            run_stage, stage, pipeline, shrinkflow_run_id, config_path=config_path, airflow_run_id=context["run_id"]
        )

    return run


def _search_fanout(pipeline: str, config_path: str, workers: int, run_id):
    """search_setup, then `workers` mapped search_worker tasks sharing one Optuna study (a server storage)."""

    @task(task_id="search_setup")
    def setup(shrinkflow_run_id: str) -> dict[str, Any]:
        from tasks.stages.search import setup as search_setup

        return run_classified(search_setup, pipeline, shrinkflow_run_id, config_path=config_path)

    @task(task_id="search_worker")
    def worker(index: int, shrinkflow_run_id: str) -> dict[str, Any]:
        from tasks.stages.search import worker as search_worker

        return run_classified(search_worker, pipeline, shrinkflow_run_id, index, config_path=config_path)

    first = setup(run_id)
    mapped = worker.partial(shrinkflow_run_id=run_id).expand(index=list(range(workers)))
    first >> mapped
    return first, mapped


def _chain(pipeline: str, cfg: PipelineConfig, config_path: str, run_id: Any, stages: tuple[str, ...],
           previous: Any) -> Any:
    """The stage tasks of one run, in order, after `previous`; the last task."""
    fan_out = cfg.search.n_trials > 0 and cfg.search.workers > 1
    for stage in stages:
        if stage == "search" and fan_out:
            # Mapped workers share the study; the search stage then runs what budget is left,
            # waits for running trials and chooses the plan.
            first, mapped = _search_fanout(pipeline, config_path, cfg.search.workers, run_id)
            previous >> first
            previous = mapped
        # After the fan-out the search runs even if a worker failed: it runs what that worker left.
        rule = "all_done" if stage == "search" and fan_out else "all_success"
        out = _stage_task(stage, pipeline, config_path, rule)(run_id)
        if previous is not None:
            previous >> out
        previous = out
    return previous


def _point_start(pipeline: str, config_path: str, point: float):
    @task(task_id="start_point")
    def start_point(shrinkflow_run_id: str) -> str:
        """The point run's run.json (the frontier run's overrides, goal.speedup = this point); its run id."""
        from tasks.frontier import start_point as start

        return run_classified(start, pipeline, shrinkflow_run_id, point, config_path=config_path)

    return start_point


def _collect_task(pipeline: str, config_path: str):
    # all_done: a point that failed does not hide the others; collect lists it as missing and then fails
    @task(task_id="frontier", trigger_rule="all_done")
    def frontier(shrinkflow_run_id: str) -> dict[str, Any]:
        """Every point's accuracy, MACs and measured latency: frontier.json, the plot and the report."""
        from tasks.frontier import collect

        return run_classified(collect, pipeline, shrinkflow_run_id, config_path=config_path)

    return frontier


def build_dag(name: str, cfg: PipelineConfig, config_path: Path):
    """The DAG of one pipeline: start (picks the run id), then every stage in order."""
    tags = ["shrinkflow", *(t for t in cfg.tags if t != "shrinkflow")]

    if isinstance(cfg.schedule, AssetSchedule):
        when = f"runs when the asset `{cfg.schedule.name}` is updated"
    else:
        when = "manual runs only" if cfg.schedule is None else f"schedule `{cfg.schedule}` (UTC)"

    @dag(
        dag_id=f"{DAG_ID_PREFIX}{name}",
        schedule=dag_schedule(cfg),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=True,  # a new pipeline waits until someone unpauses it
        tags=tags,
        params=dag_params(cfg),
        doc_md=f"### shrinkflow pipeline `{name}`\n\n{cfg.description.strip() or '(no description)'}\n\n"
        f"Declared in `{config_path}`; {when}. Trigger with params (goal, base model, run id, force) "
        "to change this run only; a run id that exists resumes it.",
        default_args=task_defaults(),
    )
    def pipeline_dag() -> None:
        @task
        def start(**context: Any) -> str:
            """Validate the trigger's params, check the pipeline, record overrides in run.json; the run id."""
            from tasks.run_params import start_run

            return run_classified(
                start_run,
                name,
                context["dag_run"].conf,
                default_run_id=context["run_id"],  # the Airflow run id, made folder-safe
                stages=STAGES,
                config_path=str(config_path),
            )

        run_id = start()
        if not cfg.goal.frontier:
            _chain(name, cfg, str(config_path), run_id, STAGES, None)
            return
        # A frontier: the data and the base once, then per point a task group running the whole chain as its
        # own point run (its data and base reused from this run), then the frontier collected.
        base = _chain(name, cfg, str(config_path), run_id, STAGES[:STAGES.index("search")], None)
        ends = []
        for point in cfg.goal.frontier:
            with TaskGroup(group_id=point_group_id(point), tooltip=f"the {point:g}x point: its own run and model"):
                point_run = _point_start(name, str(config_path), point)(run_id)
                base >> point_run
                ends.append(_chain(name, cfg, str(config_path), point_run, STAGES, point_run))
        collected = _collect_task(name, str(config_path))(run_id)
        ends >> collected

    return pipeline_dag()


_pipelines_file = resolve_pipelines_file()
try:
    _pipelines = load_pipelines(_pipelines_file)
except ConfigError as e:
    # Airflow shows this as the file's import error; the pydantic traceback behind it only repeats it.
    raise ConfigError(str(e)) from None
for _name, _cfg in _pipelines.items():
    build_dag(_name, _cfg, _pipelines_file)
