"""Scale-out figures (README "Scaling out"), in one run on this machine:

1. Search throughput (trials/hour) with 1 and with 2 Celery workers: a fresh local cluster
   (tasks/cluster.py, the topology of infra/local-cluster.sh) is started with N workers, one digits
   pipeline whose search fans out to N mapped tasks is triggered over the REST API, and throughput is
   finished trials over the span from the first trial's start to the last one's end, read from the
   PostgreSQL study. The ratio 2 workers / 1 worker is the figure. Each worker gets cores/N threads.
2. The object-store workspace's per-stage overhead against the local one: a small pipeline runs
   stage by stage locally; each stage's folder is then published to moto's S3 server, pulled into an
   empty workspace (cold cache) and pulled again (warm), timed, beside the stage's own run time.

Needs PostgreSQL and Redis on 127.0.0.1 and no cluster up (it uses the cluster's ports and databases).
    .venv/bin/python bench/scale.py [--trials 12] [--out bench/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from client import ClusterApi  # noqa: E402

from tasks import cluster  # noqa: E402

SEARCH_PIPELINE = """
pipelines:
  digits_scale:
    data: {{source: digits, val_fraction: 0.1}}
    model: {{name: resnet8, kwargs: {{width: 8}}}}
    train: {{epochs: 4, batch_size: 64, lr: 0.1}}
    goal: {{speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}}
    compression:
      plan: [{{op: channel_prune}}]
      sensitivity: {{enabled: false}}
    search: {{n_trials: {trials}, trial_epochs: 3, pruner: none}}
    finetune: {{epochs: 1, batch_size: 64, lr: 0.05}}
    targets: [host]
    compile: {{tuning: {{budget_s: 0}}}}
    benchmark: {{batch_sizes: [1], warmup: 1, repeat: 3, threads: 1}}
"""


def search_throughput(workers: int, trials: int, tmp: Path) -> dict:
    """Trials/hour of one search on a fresh cluster with `workers` Celery workers."""
    import optuna

    pipelines = tmp / f"pipelines-{workers}.yaml"
    pipelines.write_text(SEARCH_PIPELINE.format(trials=trials))
    os.environ["SHRINKFLOW_CLUSTER_DIR"] = str(tmp / f"cluster-{workers}")
    state = cluster.up(workers=workers, pipelines=pipelines)
    try:
        api = ClusterApi(state)
        api.wait_for_dag("shrinkflow__digits_scale")
        t0 = time.time()
        api.trigger("shrinkflow__digits_scale", "scale", {"run_id": "scale"})
        result = api.wait("shrinkflow__digits_scale", "scale", timeout=3600)
        wall = time.time() - t0
        if result != "success":
            raise SystemExit(f"the run failed: {api.task_states('shrinkflow__digits_scale', 'scale')}\n"
                             f"{api.failed_logs('shrinkflow__digits_scale', 'scale')}")
        env = cluster.cluster_environment(Path(state["state_dir"]), pipelines)
        study = optuna.load_study(study_name="digits_scale:scale", storage=env["SHRINKFLOW_OPTUNA_STORAGE"])
        done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
        hosts = sorted({ti["hostname"] for ti in api.task_instances("shrinkflow__digits_scale", "scale")
                        if ti["task_id"] == "search_worker"})
        return {"workers": workers, "trials": len(done), "search_span_s": round(span, 1),
                "trials_per_hour": round(len(done) / span * 3600, 1), "run_wall_s": round(wall, 1),
                "threads_per_worker": max(1, (os.cpu_count() or 2) // workers), "search_workers_on": hosts}
    finally:
        cluster.down()


WORKSPACE_PIPELINE = textwrap.dedent(
    """
    pipelines:
      digits_ws:
        data: {source: digits, val_fraction: 0.1}
        model: {name: resnet8, kwargs: {width: 16}}
        train: {epochs: 4, batch_size: 64, lr: 0.1}
        goal: {speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}
        compression:
          plan: [{op: channel_prune}, {op: quantize_int8}]
          sensitivity: {enabled: false}
        finetune: {epochs: 1, batch_size: 64, lr: 0.05}
        targets: [host]
        compile: {tuning: {budget_s: 0}}
        benchmark: {batch_sizes: [1], warmup: 1, repeat: 5, threads: 1}
    """
)


def workspace_overhead(tmp: Path) -> list[dict]:
    """Per stage: its run time, and the time to publish its folder / pull it cold / pull it warm (moto S3)."""
    code = textwrap.dedent(
        f"""
        import json, os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from tasks.stage_runner import run_stage
        from tasks.stage_specs import STAGES
        from tasks import object_store
        from tasks.workspace import run_paths
        tmp = Path({str(tmp)!r})
        cfg = tmp / "ws.yaml"
        cfg.write_text({WORKSPACE_PIPELINE!r})
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{{tmp / 'mlflow.db'}}"
        url = os.environ.pop("SHRINKFLOW_ARTIFACTS")
        rows = []
        for stage in STAGES:
            t0 = time.perf_counter()
            run_stage(stage, "digits_ws", "b", config_path=cfg, workspace=tmp / "local")
            rows.append({{"stage": stage, "run_s": time.perf_counter() - t0}})
        store = object_store.ObjectStore(url)
        local = run_paths("digits_ws", "b", tmp / "local")
        for row in rows:
            folder = local.stage_dir(row["stage"])
            files = [p for p in folder.rglob("*") if p.is_file()]
            row["files"], row["mb"] = len(files), sum(p.stat().st_size for p in files) / 1e6
            t0 = time.perf_counter(); store.publish(folder, f"runs/digits_ws/b/{{row['stage']}}")
            row["publish_s"] = time.perf_counter() - t0
            dest = tmp / "remote" / row["stage"]
            t0 = time.perf_counter(); store.pull(f"runs/digits_ws/b/{{row['stage']}}", dest, tmp / "blobs")
            row["pull_cold_s"] = time.perf_counter() - t0
            t0 = time.perf_counter(); store.pull(f"runs/digits_ws/b/{{row['stage']}}", dest, tmp / "blobs")
            row["pull_warm_s"] = time.perf_counter() - t0
        print("ROWS" + json.dumps(rows))
        """
    )
    moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", "9109"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        import boto3

        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "SHRINKFLOW_"))}
        env.update(AWS_ENDPOINT_URL="http://127.0.0.1:9109", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                   AWS_DEFAULT_REGION="us-east-1", SHRINKFLOW_ARTIFACTS="s3://bench/ws")
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket="bench")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROWS")), None)
        if line is None:
            raise SystemExit(f"the workspace bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(line[4:])
    finally:
        moto.terminate()
        moto.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    if cluster.read_state() is not None:
        raise SystemExit("a cluster is up: `infra/local-cluster.sh down` first (the bench starts its own)")
    with tempfile.TemporaryDirectory(prefix="shrinkflow-scale-") as d:
        tmp = Path(d)
        one = search_throughput(1, args.trials, tmp)
        two = search_throughput(2, args.trials, tmp)
        ratio = two["trials_per_hour"] / one["trials_per_hour"]
        print(f"search throughput: 1 worker {one['trials_per_hour']:.0f} trials/h, 2 workers "
              f"{two['trials_per_hour']:.0f} trials/h: {ratio:.2f}x ({os.cpu_count()} cores; "
              f"{one['threads_per_worker']} / {two['threads_per_worker']} threads per worker)")
        rows = workspace_overhead(tmp)
    print(f"\n{'stage':13s} {'files':>5s} {'MB':>7s} {'run s':>7s} {'publish s':>9s} {'pull cold s':>11s} "
          f"{'pull warm s':>11s} {'overhead':>8s}")
    for r in rows:
        r["overhead_pct"] = 100 * (r["publish_s"] + r["pull_cold_s"]) / r["run_s"]
        print(f"{r['stage']:13s} {r['files']:5d} {r['mb']:7.2f} {r['run_s']:7.2f} {r['publish_s']:9.3f} "
              f"{r['pull_cold_s']:11.3f} {r['pull_warm_s']:11.3f} {r['overhead_pct']:7.1f}%")
    total = sum(r["publish_s"] + r["pull_cold_s"] for r in rows)
    run = sum(r["run_s"] for r in rows)
    print(f"{'all':13s} {'':5s} {sum(r['mb'] for r in rows):7.2f} {run:7.2f} {'':9s} {'':11s} {'':11s} "
          f"{100 * total / run:7.1f}%  (publish + cold pull of every stage, against running the stages)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"throughput": [one, two], "ratio_2_over_1": round(ratio, 3),
                                          "workspace": rows, "cores": os.cpu_count(),
                                          "s3": "moto_server on 127.0.0.1"}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
