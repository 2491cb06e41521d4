"""Many workers, one study, on PostgreSQL (127.0.0.1:5432): two worker processes at once, and the Airflow
DAG's mapped worker tasks. No trial lost, none duplicated, the budget exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tasks.stage_runner import run_stage
from tasks.workspace import run_paths

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
SHRINKFLOW = str(Path(sys.executable).parent / "shrinkflow")
SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"


@pytest.fixture
def pg_databases():
    """Two fresh databases (Optuna, MLflow), dropped afterwards."""
    try:
        import psycopg2

        admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=5)
    except Exception as e:  # noqa: BLE001 - any connection failure means: no server here
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({e}); start it, or deselect with -m 'not postgres'")
    admin.autocommit = True
    names = [f"sf_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")]
    with admin.cursor() as cur:
        for n in names:
            cur.execute(f"CREATE DATABASE {n}")
    yield [f"{SERVER}/{n}" for n in names]
    with admin.cursor() as cur:
        for n in names:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (n,))
            cur.execute(f"DROP DATABASE IF EXISTS {n}")
    admin.close()


def _pipeline(tmp_path: Path, storage: str, n_trials: int, workers: int) -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(f"""
        pipelines:
          s:
            data: {{source: synthetic, num_samples: 400, image_size: 8, num_classes: 4}}
            model: {{name: resnet8, kwargs: {{width: 8}}}}
            train: {{epochs: 3, batch_size: 32, lr: 0.05}}
            goal: {{speedup: 1.5, metric: macs, max_accuracy_drop: 50}}
            compression:
              plan: [{{op: channel_prune}}]
              sensitivity: {{prune_ratios: [0.5], weight_bits: [4], val_images: 80}}
            finetune: {{epochs: 1, batch_size: 32, lr: 0.01}}
            search: {{n_trials: {n_trials}, trial_epochs: 3, pruner: none, workers: {workers}, storage: "{storage}"}}
            benchmark: {{batch_sizes: [1, 4], warmup: 1, repeat: 3, threads: 1}}
    """))
    return p


def _trials(storage: str, run_id: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=f"s:{run_id}", storage=storage).trials


def test_two_concurrent_workers_share_one_study(tmp_path, workspace, monkeypatch, pg_databases):
    optuna_url, mlflow_url = pg_databases
    cfg = _pipeline(tmp_path, optuna_url, n_trials=8, workers=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)  # the scale-out tracking server's database
    monkeypatch.setenv("SHRINKFLOW_PIPELINES", str(cfg))
    for stage in ("prepare_data", "train_base"):
        run_stage(stage, "s", "pg")
    env = dict(os.environ)
    base = [SHRINKFLOW, "search-worker", "--pipeline", "s", "--run-id", "pg"]
    setup = subprocess.run([*base, "--setup"], env=env, capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stderr[-3000:]
    workers = [subprocess.Popen([*base, "--index", str(i)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-3000:] for o in outs]
    ran = [json.loads(o[0].strip().splitlines()[-1])["trials"] for o in outs]

    trials = _trials(optuna_url, "pg")
    assert sorted(t.number for t in trials) == list(range(8))  # exactly the budget: none lost, none extra
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sum(ran) == 8 and min(ran) >= 1
    by_worker = {w: [t for t in trials if t.user_attrs["worker"] == w] for w in (0, 1)}
    assert [len(by_worker[0]), len(by_worker[1])] == ran
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == 8  # no point evaluated twice
    # the two processes really ran side by side: some trial of one overlaps some trial of the other
    assert any(a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
               for a in by_worker[0] for b in by_worker[1])

    # every trial is one nested MLflow run on the PostgreSQL tracking store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name("shrinkflow/s").experiment_id
    runs = client.search_runs([exp], filter_string="tags.`shrinkflow.stage` = 'search_trial'")
    assert sorted(int(r.data.tags["shrinkflow.trial"]) for r in runs) == list(range(8))
    assert all(r.info.status == "FINISHED" for r in runs)

    result = run_stage("search", "s", "pg")  # the reduce step: nothing left to run, it chooses
    assert len(_trials(optuna_url, "pg")) == 8 and result["trials"] == 8
    assert (run_paths("s", "pg").stage_dir("search") / "plan.json").is_file()


def test_the_dag_maps_search_workers_onto_one_postgres_study(tmp_path, pg_databases):
    optuna_url, _ = pg_databases
    cfg = _pipeline(tmp_path, optuna_url, n_trials=6, workers=2)
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "SHRINKFLOW"))}
    proc = subprocess.run([SHRINKFLOW, "--workspace", str(ws), "--config", str(cfg), "run", "s", "--run-id", "dag"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    trials = _trials(optuna_url, "dag")
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # two mapped worker tasks, each its share of three trials; the search task then had none left to run
    assert sorted(t.user_attrs["worker"] for t in trials) == [0, 0, 0, 1, 1, 1]
    state = json.loads((ws / "runs" / "s" / "dag" / "run.json").read_text())
    assert state["stages"]["search"]["trials"] == 6 and state["completed"][-1] == "register"
