"""What a run on the cluster must show: tasks spread over the workers (recorded per task instance),
search trials running at the same time on both, every stage published whole with its lineage, and one
registry version per run."""

from __future__ import annotations

import json
from typing import Any

from tasks.stage_specs import STAGES, spec


def check_spread(api, dag_id: str, run_id: str, workers: list[str]) -> dict[tuple[str, int], str]:
    """Every task instance ran on one of the workers (Airflow's hostname column), both were used, and the
    mapped search workers ran on different workers. (task_id, map_index) -> worker."""
    tis = api.task_instances(dag_id, run_id)
    ran = {(ti["task_id"], ti.get("map_index", -1)): ti["hostname"] for ti in tis if ti["state"] == "success"}
    assert ran and all(h in workers for h in ran.values()), f"hostnames not among {workers}: {ran}"
    assert set(ran.values()) == set(workers), f"not every worker ran a task: {ran}"
    mapped = {h for (t, _), h in ran.items() if t == "search_worker"}
    assert len(mapped) == len(workers), f"the search workers did not run on {len(workers)} workers: {ran}"
    return ran


def check_trials(storage: str, study_name: str, n_trials: int) -> list[tuple[int, int]]:
    """The study holds n_trials finished trials (none lost, none duplicated) and trials of two workers
    overlapped in time. Returns the overlapping (trial, trial) pairs."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n_trials, (
        f"{study_name}: {len(finished)} finished trials, want {n_trials}: "
        f"{[(t.number, t.state.name) for t in study.trials]}")
    overlaps = [(a.number, b.number) for a in finished for b in finished
                if a.number < b.number and a.user_attrs.get("worker") != b.user_attrs.get("worker")
                and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlaps, f"{study_name}: no two trials of different workers overlapped: " + str(
        [(t.number, t.user_attrs.get("worker"), str(t.datetime_start), str(t.datetime_complete)) for t in finished])
    return overlaps


def check_published(store, pipeline: str, run_id: str) -> dict[str, Any]:
    """Every stage is published whole (its manifest is the digest run.json records), and each stage's
    recorded inputs are the published outputs of its upstream stages (the lineage). run.json."""
    state = json.loads(store.get_bytes(f"runs/{pipeline}/{run_id}/run.json"))
    assert state["completed"] == list(STAGES), state.get("completed")
    for stage in STAGES:
        m = store.manifest(f"runs/{pipeline}/{run_id}/{stage}")
        rec = state["stages"][stage]
        assert m is not None, f"{stage} is not published"
        assert m["digest"] == rec["outputs"]["digest"], f"{stage}: run.json and the published manifest differ"
        for relpath, info in m["files"].items():
            assert store.exists(f"blobs/{info['sha256']}"), f"{stage}/{relpath}: blob missing"
        for up in spec(stage).upstream:
            assert rec["inputs"]["upstream"][up] == state["stages"][up]["outputs"]["digest"], (
                f"{stage} read {up} {rec['inputs']['upstream'][up][:12]}, but {up} published "
                f"{state['stages'][up]['outputs']['digest'][:12]}")
    return state


def registry_versions(tracking_uri: str, pipeline: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return client.search_model_versions(f"name = 'shrinkflow-{pipeline}'")
