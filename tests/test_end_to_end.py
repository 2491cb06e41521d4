"""digits_tiny through the real Airflow DAG (dag.test(), in-process, SQLite), as `shrinkflow run` does it.

Runs in a subprocess so Airflow reads the test's own AIRFLOW_HOME at import; then checks the
artifacts, the MLflow runs and the registry, and that the compressed model met its goal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare_data", "train_base", "search", "compress", "finetune", "compile", "benchmark", "register")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("e2e") / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "SHRINKFLOW"))}
    shrinkflow = Path(sys.executable).parent / "shrinkflow"
    proc = subprocess.run(
        [str(shrinkflow), "--workspace", str(ws), "run", "digits_tiny", "--run-id", "e2e"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, f"shrinkflow run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return ws, proc


def test_every_stage_wrote_its_artifacts(e2e_run):
    ws, proc = e2e_run
    run = ws / "runs" / "digits_tiny" / "e2e"
    state = json.loads((run / "run.json").read_text())
    assert state["completed"] == list(STAGES)
    for f in ("prepare_data/dataset.npz", "train_base/model.pt", "compress/plan.json", "finetune/model.pt",
              "compile/compressed/host/model.so", "compile/compressed/model.onnx", "benchmark/latency.json",
              "register/report.md", "register/model/model.pt", "search/sensitivity.png",
              "search/sensitivity.json", "search/pareto.png", "search/trials.csv", "search/choice.json", "finetune/model.packed", "compile/compressed/model.int8.onnx"):
        assert (run / f).is_file(), f
    assert not list(run.glob(".*.tmp")), "scratch folders left behind"
    assert "goal MET" in proc.stdout and "latency tvm host b1" in proc.stdout
    assert "[shrinkflow] base model: test accuracy" in proc.stderr  # progress on the terminal, as before


def test_compressed_model_meets_its_goal(e2e_run):
    ws, _ = e2e_run
    run = ws / "runs" / "digits_tiny" / "e2e"
    base = json.loads((run / "train_base/metrics.json").read_text())
    comp = json.loads((run / "finetune/metrics.json").read_text())
    assert base["test_accuracy"] > 93.0  # a trained base, not chance (10 %)
    assert comp["macs_reduction"] >= 1.5
    assert base["test_accuracy"] - comp["test_accuracy"] <= 3.0
    assert comp["goal_met"] is True
    # the plan ends in int8: the goal is checked on the quantized model, and the float one is kept too
    assert comp["post_training_ops"] == ["quantize_int8"] and "test_accuracy_before_post_ops" in comp
    sens = json.loads((run / "search/sensitivity.json").read_text())
    assert {s["kind"] for s in sens["scans"]} == {"channel_prune", "weight_bits"}


def test_compiled_artifacts_agree_with_pytorch(e2e_run):
    ws, _ = e2e_run
    lat = json.loads((ws / "runs/digits_tiny/e2e/benchmark/latency.json").read_text())
    engines = {(c["model"], c["engine"]) for c in lat["checks"]}
    assert {("compressed", "tvm"), ("compressed", "onnxruntime"), ("base", "tvm")} <= engines
    for c in lat["checks"]:
        if c["engine"] == "onnxruntime_int8":  # quantized: close to float, not equal
            assert c["top1_agreement_vs_pytorch"] > 0.95, c
        elif c["engine"] == "fpga_hls":  # fixed point vs the quantized model: checked below
            continue
        elif c["engine"] != "pytorch":
            assert c["max_abs_diff_vs_pytorch"] < 1e-3, c
            assert c["top1_agreement_vs_pytorch"] > 0.99, c
    assert ("compressed", "onnxruntime_int8") in engines
    assert {p["batch"] for p in lat["pairs"]} == {1, 32}
    assert all(p["base_ms"] > 0 and p["compressed_ms"] > 0 for p in lat["pairs"])
    # the fastest engine per target and batch is picked, and the package says which file to deploy
    run = ws / "runs/digits_tiny/e2e"
    assert set(lat["best"]["host"]) == {"1", "32"}
    for b, v in lat["best"]["host"].items():
        fastest = min((r for r in lat["rows"] if r["model"] == "compressed" and r["batch"] == int(b)),
                      key=lambda r: r["median_ms"])
        assert v["engine"] == fastest["engine"]
    deploy = json.loads((run / "register/model/deploy.json").read_text())
    assert all((run / "register/model" / v["artifact"]).is_file() for v in deploy["host"].values())
    table = (run / "benchmark/latency.txt").read_text()
    assert "b32 p90 ms" in table and "artifact kB" in table
    assert "## Latency per target and engine" in (run / "register/report.md").read_text()
    # the FPGA flow: the hls4ml C simulation agrees with the quantized PyTorch model; estimates reported
    fpga = next(c for c in lat["checks"] if c["engine"] == "fpga_hls")
    assert fpga["target"] == "fpga_zu7ev" and fpga["top1_agreement_vs_pytorch"] >= 0.99, fpga
    est = lat["estimates"]["fpga_zu7ev"]
    assert est["totals"]["dsp"] > 0 and est["latency_cycles"][0] > 0 and "not synthesis" in est["kind"]
    assert (run / "compile/compressed/fpga_zu7ev/meta.json").is_file()
    assert "Estimated, not synthesised" in table
    # compile.json lists every artifact the registry's engines built, with its engine's metadata
    compiled = json.loads((run / "compile/compile.json").read_text())
    built = {(a["model"], a["engine"], a["target"]): a for a in compiled["artifacts"]}
    assert set(built) == {(m, e, "host") for m in ("base", "compressed") for e in ("pytorch", "onnxruntime", "tvm")} | {
        ("compressed", "onnxruntime_int8", "host"), ("compressed", "fpga_hls", "fpga_zu7ev")}
    host = built[("compressed", "tvm", "host")]
    assert host["path"] == "compressed/host" and (run / "compile" / host["path"] / "model.so").is_file()
    assert host["meta"]["tuning"]["kernels"] > 0 and host["meta"]["vector_lanes"] in (4, 8, 16)


def test_mlflow_parent_and_nested_stage_runs(e2e_run):
    ws, _ = e2e_run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shrinkflow/digits_tiny")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`shrinkflow.run_id` = 'e2e'")
    parents = [r for r in runs if r.data.tags["shrinkflow.stage"] == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for tag in ("git_commit", "data_hash", "airflow_run_id", "registry_alias"):
        assert parent.data.tags.get(tag), tag
    trials = [r for r in runs if r.data.tags["shrinkflow.stage"] == "search_trial"]
    children = {r.data.tags["shrinkflow.stage"]: r for r in runs
                if r is not parent and r.data.tags["shrinkflow.stage"] not in ("pipeline", "search_trial")}
    assert set(children) == set(STAGES)
    # every search trial is a run nested under the search stage's run
    assert sorted(int(r.data.tags["shrinkflow.trial"]) for r in trials) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {children["search"].info.run_id}
    assert all("plan.json" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in trials)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert children["finetune"].data.metrics["test_accuracy"] > 90
    assert "val_accuracy" in children["train_base"].data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "latency.json", "search"} <= arts
    # the package is an MLflow Model logged by the parent run, and the registered version is that model
    logged = [o.model_id for o in parent.outputs.model_outputs]
    assert len(logged) == 1
    search_arts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/pareto.png", "search/trials.csv", "search/plan.json"} <= search_arts
    mv = client.get_model_version_by_alias("shrinkflow-digits_tiny", "champion")
    assert mv.tags["shrinkflow_run_id"] == "e2e"
    assert mv.source == f"models:/{logged[0]}" and mv.tags["gate.promoted"] == "true"
    decision = json.loads((ws / "runs/digits_tiny/e2e/register/decision.json").read_text())
    assert decision["promoted"] and decision["champion"] is None and decision["challenger"]["test_accuracy"] > 90


PREDICT = """
import json, sys
import numpy as np, mlflow.pyfunc
m = mlflow.pyfunc.load_model("models:/shrinkflow-digits_tiny@champion")
x = np.load(sys.argv[1])
np.save(sys.argv[2], m.predict(x))
print(json.dumps({"engine": m.unwrap_python_model().package.engine_for(len(x))}))
"""


def test_champion_serves_the_benchmarks_outputs_in_a_fresh_process(e2e_run, tmp_path):
    """mlflow.pyfunc.load_model("models:/<name>@champion").predict(test split) in a new process runs the
    engine deploy.json chose and agrees with the benchmark's check of that engine."""
    ws, _ = e2e_run
    run = ws / "runs/digits_tiny/e2e"
    from tasks.data.dataset import load_dataset_file
    from tasks.data.loaders import Splits
    from tasks.engines.pytorch_eager import TorchRunner
    from tasks.models.checkpoint import load_checkpoint

    info = json.loads((run / "prepare_data/dataset.json").read_text())
    sp = Splits(load_dataset_file(run / "prepare_data/dataset.npz"), info["mean"], info["std"])
    x, y = sp.tensors["test"][0].numpy(), sp.tensors["test"][1].numpy()
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "SHRINKFLOW"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", PREDICT, str(tmp_path / "x.npy"), str(tmp_path / "out.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    engine = json.loads(proc.stdout.strip().splitlines()[-1])["engine"]
    deploy = json.loads((run / "register/model/deploy.json").read_text())["host"]
    largest = max(deploy, key=int)
    assert engine == deploy[largest]["engine"]
    logits = np.load(tmp_path / "out.npy")
    lat = json.loads((run / "benchmark/latency.json").read_text())
    check = next(c for c in lat["checks"] if (c["model"], c["engine"], c["target"]) == ("compressed", engine, "host"))
    assert abs(100.0 * (logits.argmax(1) == y).mean() - check["test_accuracy"]) < 0.5
    ref = TorchRunner(load_checkpoint(run / "finetune/model.pt")[0]).run(x)  # the benchmark's reference
    agree = (logits.argmax(1) == ref.argmax(1)).mean()
    if engine.endswith("_int8"):  # quantized: what the benchmark measured for that engine, to the image
        assert abs(agree - check["top1_agreement_vs_pytorch"]) < 0.01
    else:
        assert np.abs(logits - ref).max() < 1e-3 and agree > 0.99


def test_rerunning_a_stage_replaces_it(e2e_run):
    """Idempotent tasks: the same run id again gives one child run per stage and no extra version."""
    ws, _ = e2e_run
    env = {**os.environ, "SHRINKFLOW_HOME": str(ws)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "tasks", "register", "--pipeline", "digits_tiny", "--run-id", "e2e"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shrinkflow/digits_tiny")
    reg = client.search_runs([exp.experiment_id], filter_string="tags.`shrinkflow.stage` = 'register'")
    assert len(reg) == 1
    versions = client.search_model_versions("name = 'shrinkflow-digits_tiny'")
    assert len(versions) == 1
    assert json.loads(out.stdout)["alias"] == "champion"
