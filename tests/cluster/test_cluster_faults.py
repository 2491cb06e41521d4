"""`make cluster-faults`: faults on a cluster of the tests' own (two small digits pipelines), in order:

1. three runs of two pipelines started at once: none clobbers another, each gets exactly one registry
   version, the champion moves form one unbroken chain;
2. the MLflow tracking server stopped for 30 s during a run: the stage retries and the run completes,
   every stage published whole;
3. one Celery worker SIGKILLed (its whole process tree: a lost machine) in the middle of a search trial:
   the task is retried on the other worker, the study loses no trial and duplicates none, nothing is
   half-published.
"""

from __future__ import annotations

import json
import textwrap
import time

import pytest
from checks import check_published, registry_versions
from client import ClusterApi
from conftest import start_own_cluster

from tasks import cluster

pytestmark = pytest.mark.cluster_faults

TINY, SMALL = "shrinkflow__digits_tiny", "shrinkflow__digits_small"
N_TRIALS = 6
# Every run computes every stage: an unchanged one would be reused from an earlier run (tasks/stage_cache.py),
# registering no new version and running no trial.
FORCED = {"force": True}


def _pipeline(name: str, width: int, trial_epochs: int) -> str:
    return textwrap.indent(textwrap.dedent(
        f"""
          {name}:
            data: {{source: digits, val_fraction: 0.1}}
            model: {{name: resnet8, kwargs: {{width: {width}}}}}
            train: {{epochs: 4, batch_size: 64, lr: 0.1}}
            goal: {{speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}}
            compression:
              plan: [{{op: channel_prune}}]
              sensitivity: {{enabled: false}}
            search: {{n_trials: {N_TRIALS}, trial_epochs: {trial_epochs}, pruner: none, heartbeat_seconds: 5}}
            finetune: {{epochs: 1, batch_size: 64, lr: 0.05}}
            targets: [host]
            compile: {{tuning: {{budget_s: 0}}}}
            benchmark: {{batch_sizes: [1], warmup: 1, repeat: 3, threads: 1}}
        """
    ), "  ")


PIPELINES = "pipelines:" + _pipeline("digits_tiny", 16, 8) + _pipeline("digits_small", 4, 2)


@pytest.fixture(scope="module")
def faults_cluster(tmp_path_factory):
    yield from start_own_cluster(tmp_path_factory.mktemp("faults"), PIPELINES)


@pytest.fixture(scope="module")
def api(faults_cluster):
    client = ClusterApi(faults_cluster)
    for dag in (TINY, SMALL):
        client.wait_for_dag(dag)
    return client


def _ok(api: ClusterApi, dag: str, run_id: str, timeout: float = 1200) -> None:
    state = api.wait(dag, run_id, timeout)
    assert state == "success", f"{dag} {run_id}: {api.task_states(dag, run_id)}\n{api.failed_logs(dag, run_id)}"


def _store(env):
    from tasks import object_store

    return object_store.ObjectStore(env["SHRINKFLOW_ARTIFACTS"])


def test_three_runs_of_two_pipelines_at_once(faults_cluster, api, use_cluster_env):
    env = use_cluster_env(faults_cluster)
    runs = [(TINY, "c-1"), (TINY, "c-2"), (SMALL, "c-3")]
    for dag, run_id in runs:
        api.trigger(dag, run_id, FORCED | {"run_id": run_id})
    for dag, run_id in runs:
        _ok(api, dag, run_id)
    store = _store(env)
    versions: dict[str, list[str]] = {}
    for dag, run_id in runs:
        pipeline = dag.removeprefix("shrinkflow__")
        run = check_published(store, pipeline, run_id)  # each run's folders are its own, whole
        versions.setdefault(pipeline, []).append(str(run["stages"]["register"]["version"]))
    for pipeline, mine in versions.items():
        registered = sorted(v.version for v in registry_versions(env["MLFLOW_TRACKING_URI"], pipeline))
        assert sorted(mine) == registered, f"{pipeline}: runs registered {mine}, the registry holds {registered}"
    # The champion moves of digits_tiny form one chain: each starts where the one before ended.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    history = json.loads(client.get_registered_model("shrinkflow-digits_tiny").tags.get("champion_history", "[]"))
    for before, after in zip(history, history[1:], strict=False):
        assert str(after["from"]) == str(before["to"]), history


def test_mlflow_down_for_30_s_during_a_run(faults_cluster, api, use_cluster_env):
    env = use_cluster_env(faults_cluster)
    api.trigger(SMALL, "m-1", FORCED | {"run_id": "m-1"})
    deadline = time.monotonic() + 300
    while api.task_states(SMALL, "m-1").get(("train_base", -1), (None,))[0] != "running":
        assert time.monotonic() < deadline, api.task_states(SMALL, "m-1")
        time.sleep(1)
    cluster.stop_component(faults_cluster, "mlflow")
    time.sleep(30)
    cluster.restart(faults_cluster, "mlflow")
    _ok(api, SMALL, "m-1")
    check_published(_store(env), "digits_small", "m-1")
    tries = {k: v[2] for k, v in api.task_states(SMALL, "m-1").items()}
    print(f"MLflow down 30 s: task attempts {tries}")


def test_a_worker_killed_mid_trial(faults_cluster, api, use_cluster_env):
    import optuna

    env = use_cluster_env(faults_cluster)
    storage = optuna.storages.RDBStorage(env["SHRINKFLOW_OPTUNA_STORAGE"])
    api.trigger(TINY, "k-1", FORCED | {"run_id": "k-1"})
    deadline = time.monotonic() + 600
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, api.task_states(TINY, "k-1")
        states = api.task_states(TINY, "k-1")
        hosts = {i: h for (t, i), (s, h, _) in states.items() if t == "search_worker" and s == "running" and h}
        if hosts and "digits_tiny:k-1" in optuna.get_all_study_names(storage):
            study = optuna.load_study(study_name="digits_tiny:k-1", storage=storage)
            running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
                       and t.user_attrs.get("worker") in hosts]
            if running:
                killed_trial = running[0]
                victim = hosts[killed_trial.user_attrs["worker"]]
                continue
        time.sleep(0.5)
    killed = cluster.kill(faults_cluster, victim)
    print(f"killed {victim} ({len(killed)} processes) during trial {killed_trial.number}")
    try:
        _ok(api, TINY, "k-1", timeout=1500)
    finally:
        cluster.restart(faults_cluster, victim)
    survivor = next(w for w in faults_cluster["workers"] if w != victim)
    retried = {k: v for k, v in api.task_states(TINY, "k-1").items() if k[0] == "search_worker"}
    assert any(h == survivor and tries > 1 for _, h, tries in retried.values()), retried

    study = optuna.load_study(study_name="digits_tiny:k-1", storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == N_TRIALS, [(t.number, t.state.name) for t in trials]  # none lost, none extra
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert killed_trial.number in [t.number for t in failed], [(t.number, t.state.name) for t in trials]
    # The killed trial's point was run again by a live worker (Optuna's stale-trial retry).
    assert any(t.params == killed_trial.params for t in finished), "the killed trial was not retried"
    check_published(_store(env), "digits_tiny", "k-1")
