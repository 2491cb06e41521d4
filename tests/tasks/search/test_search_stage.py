"""The search stage on a tiny synthetic pipeline: trials as nested MLflow runs, the choice and its record,
infeasible goals said plainly, resume, a killed worker's trial retried, warm start from the last run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tasks.errors import StageError
from tasks.plan import PLAN_FORMAT, plan_from_json
from tasks.stage_runner import run_stage
from tasks.workspace import read_json, run_paths

SEARCH_PIPELINE = textwrap.dedent(
    """
    pipelines:
      s:
        data: {source: synthetic, num_samples: 400, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 8}}
        train: {epochs: 4, batch_size: 32, lr: 0.05}
        goal: GOAL
        compression:
          plan: [{op: channel_prune}, {op: quantize_int8, calibration: minmax}]
          sensitivity: {prune_ratios: [0.5], weight_bits: [4], val_images: 80}
        finetune: {epochs: 1, batch_size: 32, lr: 0.01}
        search: SEARCH
    """
)


def _pipeline(tmp_path: Path, search: str, goal: str = "{speedup: 1.5, metric: macs, max_accuracy_drop: 50}") -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(SEARCH_PIPELINE.replace("SEARCH", search).replace("GOAL", goal))
    return p


def _base(cfg: Path, run_id: str) -> None:
    for stage in ("prepare_data", "train_base"):
        run_stage(stage, "s", run_id, config_path=cfg)


def _study(ws: Path, run_id: str) -> optuna.Study:
    return optuna.load_study(study_name=f"s:{run_id}", storage=f"sqlite:///{ws / 'optuna.db'}")


def _mlflow(ws: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    return client, client.get_experiment_by_name("shrinkflow/s").experiment_id


def _runs(ws: Path, run_id: str, stage: str):
    client, exp = _mlflow(ws)
    return client.search_runs(
        [exp], filter_string=f"tags.`shrinkflow.run_id` = '{run_id}' and tags.`shrinkflow.stage` = '{stage}'"
    )


def test_search_chooses_a_plan_and_records_every_trial(tmp_path, workspace):
    cfg = _pipeline(tmp_path, "{n_trials: 5, trial_epochs: 2}")
    _base(cfg, "r1")
    result = run_stage("search", "s", "r1", config_path=cfg)
    assert result["searched"] and result["feasible"]
    out = run_paths("s", "r1").stage_dir("search")
    choice = json.loads((out / "choice.json").read_text())
    assert choice["feasible"] and "meeting the goal's cost limits" in choice["why"]
    assert choice["metrics"]["macs_reduction"] >= 1.5  # the speedup goal is solved inside every trial
    assert json.loads((out / "plan.json").read_text())["format"] == PLAN_FORMAT
    plan = plan_from_json(read_json(out / "plan.json"))
    assert [p.op for p in plan] == ["channel_prune", "quantize_int8", "distill"]
    assert plan[0].target_macs_reduction == 1.5 and plan[0].layer_scale
    rows = json.loads((out / "trials.json").read_text())
    assert [r["trial"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["warm_start"] == "sensitivity"  # the scan's shape is tried first
    assert rows[1]["warm_start"] == "default"  # then the uniform cut a run without the search makes
    assert {"pareto.png", "efficiency.png", "trials.csv", "sensitivity.json", "sensitivity.png"} <= {
        p.name for p in out.iterdir()}
    assert len((out / "trials.csv").read_text().splitlines()) == 6
    # budget accounting: each trial's training images (full trials alike, pruned ones fewer), summed
    full = {r["train_images"] for r in rows if r["state"] == "COMPLETE"}
    assert len(full) == 1 and full.pop() > 0
    assert all(0 < r["train_images"] for r in rows if r["state"] == "PRUNED")
    assert choice["budget"] == {"trials": 5, "train_images": sum(r["train_images"] for r in rows)}

    # MLflow: pipeline run -> search run -> one run per trial, each with its plan
    (parent,) = _runs(workspace, "r1", "pipeline")
    (search,) = _runs(workspace, "r1", "search")
    trials = _runs(workspace, "r1", "search_trial")
    assert search.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert sorted(int(t.data.tags["shrinkflow.trial"]) for t in trials) == [0, 1, 2, 3, 4]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {search.info.run_id}
    client, _ = _mlflow(workspace)
    done = [t for t in trials if t.data.tags["trial_state"] == "COMPLETE"]
    assert done and all(t.info.status == "FINISHED" and "val_accuracy" in t.data.metrics for t in done)
    assert "plan.json" in {a.path for a in client.list_artifacts(done[0].info.run_id)}
    assert {"search/pareto.png", "search/plan.json", "search/trials.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "search")}

    # the compress stage applies the chosen plan
    run_stage("compress", "s", "r1", config_path=cfg)
    applied = plan_from_json(read_json(run_paths("s", "r1").stage_dir("compress") / "plan.json"))
    assert applied[0].layer_scale == plan[0].layer_scale
    # the fine-tune stage sums the run's training: the search's trials, in epochs of the training split
    run_stage("finetune", "s", "r1", config_path=cfg)
    m = read_json(run_paths("s", "r1").stage_dir("finetune") / "metrics.json")
    assert m["budget_finetune_epochs"] == 1 and m["budget_compress_epochs"] == 0
    assert 0 < m["budget_search_epochs"] <= 5 * 2  # 5 trials of 2 epochs on a subset at most
    assert m["budget_total_epochs"] == pytest.approx(m["budget_search_epochs"] + 1)


def test_an_infeasible_goal_is_reported_and_the_closest_kept(tmp_path, workspace):
    cfg = _pipeline(tmp_path, "{n_trials: 3, trial_epochs: 1}", goal="{size_mb: 0.000001, max_accuracy_drop: 50}")
    _base(cfg, "r1")
    result = run_stage("search", "s", "r1", config_path=cfg)
    assert result["feasible"] is False
    choice = json.loads((run_paths("s", "r1").stage_dir("search") / "choice.json").read_text())
    assert choice["why"].startswith("NO trial met the goal; kept the closest")
    assert "size_mb<=1e-06" in choice["why"]
    (parent,) = _runs(workspace, "r1", "pipeline")
    assert parent.data.tags["search_goal_met"] == "false"


def test_a_goal_out_of_reach_fails_with_the_reason(tmp_path, workspace):
    cfg = _pipeline(tmp_path, "{n_trials: 2, trial_epochs: 1}", goal="{speedup: 5000, metric: macs, max_accuracy_drop: 50}")
    _base(cfg, "r1")
    with pytest.raises(StageError, match="none of 2 trials completed") as err:
        run_stage("search", "s", "r1", config_path=cfg)
    assert "out of reach by channel pruning" in str(err.value) and "Relax the goal" in str(err.value)
    assert not run_paths("s", "r1").stage_dir("search").exists()


def test_rerunning_the_stage_resumes_the_study(tmp_path, workspace):
    cfg = _pipeline(tmp_path, "{n_trials: 3, trial_epochs: 1}")
    _base(cfg, "r1")
    run_stage("search", "s", "r1", config_path=cfg)
    first = {t.number: t.params for t in _study(workspace, "r1").trials}
    (search_run,) = _runs(workspace, "r1", "search")
    cfg = _pipeline(tmp_path, "{n_trials: 5, trial_epochs: 1}")  # a larger budget: two more trials
    run_stage("search", "s", "r1", config_path=cfg)
    trials = _study(workspace, "r1").trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert {t.number: t.params for t in trials[:3]} == first  # the first three were not re-run
    (again,) = _runs(workspace, "r1", "search")
    assert again.info.run_id == search_run.info.run_id  # the same MLflow run continues
    assert len(_runs(workspace, "r1", "search_trial")) == 5


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "interrupted"])
def test_a_stopped_workers_trial_is_failed_and_run_again(tmp_path, workspace, how):
    # 20 epochs: a trial long enough that the signal lands mid-training, not after its last epoch
    cfg = _pipeline(tmp_path, "{n_trials: 3, trial_epochs: 20, pruner: none, heartbeat_seconds: 1}")
    _base(cfg, "r1")
    env = {**os.environ, "SHRINKFLOW_HOME": str(workspace), "SHRINKFLOW_PIPELINES": str(cfg)}
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "shrinkflow"), "search-worker", "--pipeline", "s", "--run-id", "r1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    running = []
    while time.time() < deadline and not running and worker.poll() is None:
        try:
            # a trial that has its parameters: killed mid-training
            running = [t for t in _study(workspace, "r1").get_trials(states=(TrialState.RUNNING,)) if t.params]
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.05)
    assert running, f"the worker never started a trial: {worker.communicate()[0][-2000:]!r}"
    # SIGKILL: a preempted machine, no cleanup, the trial stays RUNNING until its heartbeat is stale;
    # SIGINT (Ctrl-C): the worker fails the trial and queues it again on its way out
    worker.send_signal(how)
    assert worker.wait(timeout=60) == (-9 if how == signal.SIGKILL else 130)
    killed = running[0]
    if how == signal.SIGINT:
        waiting = _study(workspace, "r1").get_trials(states=(TrialState.WAITING,))
        # the killed trial queued again, beside the warm start's points not yet run
        assert [t.system_attrs["failed_trial"] for t in waiting if "failed_trial" in t.system_attrs] == [killed.number]

    run_stage("search", "s", "r1", config_path=cfg)  # waits out the stale heartbeat, re-queues, finishes
    trials = _study(workspace, "r1").trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed.number]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    # The snapshot above may have caught the trial between two suggest calls (some parameters only):
    # the failed trial as stored holds them all, and the retry runs exactly those.
    assert killed.params.items() <= failed[0].params.items()
    assert retry.params == failed[0].params and retry.state == TrialState.COMPLETE
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_new_run_starts_from_the_previous_runs_choice(tmp_path, workspace):
    cfg = _pipeline(tmp_path, "{n_trials: 2, trial_epochs: 1}")
    _base(cfg, "r1")
    run_stage("search", "s", "r1", config_path=cfg)
    chosen = json.loads((run_paths("s", "r1").stage_dir("search") / "choice.json").read_text())
    _base(cfg, "r2")
    run_stage("search", "s", "r2", config_path=cfg, force=True)  # unchanged inputs would reuse r1's search
    first = _study(workspace, "r2").trials[0]
    assert first.user_attrs["warm_start"] == "previous_run:r1"
    assert first.params == {k: v for k, v in chosen["point"].items() if k in first.params}
    assert set(first.params) == set(_study(workspace, "r1").trials[0].params)


def test_multi_objective_search_returns_a_pareto_front(tmp_path, workspace):
    cfg = _pipeline(tmp_path, "{n_trials: 6, trial_epochs: 1, sampler: nsga2, cost: macs}",
                    goal="{speedup: 1.2, metric: macs, max_accuracy_drop: 50}")
    _base(cfg, "r1")
    run_stage("search", "s", "r1", config_path=cfg)
    study = _study(workspace, "r1")
    assert len(study.directions) == 2
    out = run_paths("s", "r1").stage_dir("search")
    choice = json.loads((out / "choice.json").read_text())
    front = {t.number for t in study.best_trials}
    feasible_front = [t for t in study.best_trials if all(c <= 0 for c in t.user_attrs["constraints"])]
    if feasible_front:
        assert choice["trial"] in front
        assert choice["metrics"]["macs_reduction"] >= 1.2
    assert "prune.ratio" in choice["point"] and (out / "pareto.png").stat().st_size > 10_000
