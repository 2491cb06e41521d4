"""Incremental runs: unchanged stages are reused, changed ones (and what follows) re-run, resume, --force.

One tiny synthetic run (prepare_data .. finetune, ~10 s) is made once; each test works on a copy of
that workspace. compile/benchmark/register (TVM, ~30 s) are covered by the slow test at the end.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tasks.stage_runner import run_stage
from tasks.stage_specs import STAGES
from tasks.workspace import run_paths

FAST = STAGES[:5]  # prepare_data .. finetune
REPO = Path(__file__).resolve().parents[2]

PIPELINE = textwrap.dedent(
    """
    pipelines:
      tiny:
        data: {source: synthetic, num_samples: 400, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 8}}
        train: {epochs: 1, batch_size: 32, lr: 0.05}
        goal: {speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}
        compression: {sensitivity: {enabled: false}}
        finetune: {epochs: 1, batch_size: 32, lr: 0.01}
        targets: [host]
        compile: {tuning: {budget_s: 0}}
        benchmark: {batch_sizes: [1], warmup: 1, repeat: 2, threads: 1, engines: [pytorch, onnxruntime, tvm]}
    """
)


def _run(ws: Path, cfg: Path, run_id: str, stages=FAST, pipeline: str = "tiny") -> dict:
    for s in stages:
        run_stage(s, pipeline, run_id, config_path=cfg, workspace=ws)
    return run_paths(pipeline, run_id, ws).read_state()


def _how(state: dict) -> dict[str, str]:
    """stage -> 'reused' / 'ran'."""
    return {s: ("reused" if r.get("reused") else "ran") for s, r in state["stages"].items()}


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("incr")
    cfg = root / "p.yaml"
    cfg.write_text(PIPELINE)
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        _run(root / "ws", cfg, "r1")
    finally:
        mp.undo()
    return root


@pytest.fixture
def ws(base_ws, tmp_path, monkeypatch):
    """A copy of the workspace holding run r1, and its pipelines file."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(base_ws / "ws", tmp_path / "ws", symlinks=True)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(PIPELINE)
    return tmp_path / "ws", cfg


def test_first_run_records_fingerprints_and_manifests(base_ws):
    state = run_paths("tiny", "r1", base_ws / "ws").read_state()
    assert state["completed"] == list(FAST)
    for s in FAST:
        rec = state["stages"][s]
        assert rec["reused"] is False and rec["changed"] == "no earlier output"
        assert len(rec["fingerprint"]) == 64
        assert rec["outputs"]["files"] and len(rec["outputs"]["digest"]) == 64
        index = base_ws / "ws" / "cache" / "stages" / s / f"{rec['fingerprint']}.json"
        assert json.loads(index.read_text())["runs"] == [{"pipeline": "tiny", "run_id": "r1"}]
    assert "model.pt" in state["stages"]["train_base"]["outputs"]["files"]


def test_second_run_reuses_every_stage(ws, capsys):
    ws, cfg = ws
    state = _run(ws, cfg, "r2")
    assert _how(state) == {s: "reused" for s in FAST}
    for s in FAST:
        rec = state["stages"][s]
        assert rec["reused_from"] == "r1"
        assert rec["reason"] == "inputs, config and code unchanged since run r1"
    r1, r2 = run_paths("tiny", "r1", ws), run_paths("tiny", "r2", ws)
    a, b = r1.stage_dir("train_base") / "model.pt", r2.stage_dir("train_base") / "model.pt"
    assert a.stat().st_ino == b.stat().st_ino  # hard-linked, not copied
    assert state["stages"]["finetune"]["test_accuracy"] == r1.read_state()["stages"]["finetune"]["test_accuracy"]
    # MLflow: each reused stage still has its child run, marked as reused
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shrinkflow/tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`shrinkflow.run_id` = 'r2' and tags.`shrinkflow.reused` = 'true'")
    assert {r.data.tags["shrinkflow.stage"] for r in runs} == set(FAST)
    tb = next(r for r in runs if r.data.tags["shrinkflow.stage"] == "train_base")
    assert tb.data.tags["shrinkflow.reused_from"] == "r1" and "test_accuracy" in tb.data.metrics
    from tasks.report import print_run_summary

    print_run_summary(r2)
    out = capsys.readouterr().out
    assert "reused from r1" in out and "inputs, config and code unchanged since run r1" in out


def test_changed_config_section_reruns_that_stage_and_what_depends_on_it(ws):
    ws, cfg = ws
    # the run's overrides (as the DAG's trigger params store them) change the goal section
    run_paths("tiny", "r2", ws).update_state(overrides={"goal": {"max_accuracy_drop": 40.0}})
    state = _run(ws, cfg, "r2")
    assert _how(state) == {"prepare_data": "reused", "train_base": "reused", "search": "ran",
                           "compress": "reused", "finetune": "ran"}
    assert state["stages"]["search"]["changed"] == "config section goal changed"
    assert state["stages"]["finetune"]["changed"] == "config section goal changed"
    # the search re-ran but chose the same plan: compress's inputs are unchanged (DVC-style early cut-off)
    assert state["stages"]["compress"]["reused_from"] == "r1"


def test_changed_upstream_output_reruns_downstream(ws):
    ws, cfg = ws
    cfg.write_text(PIPELINE.replace("lr: 0.05", "lr: 0.04"))
    state = _run(ws, cfg, "r2")
    assert _how(state) == {"prepare_data": "reused", **{s: "ran" for s in FAST[1:]}}
    assert state["stages"]["train_base"]["changed"] == "config section train changed"
    assert "upstream train_base changed" in state["stages"]["compress"]["changed"]


def test_code_change_reruns_the_stage(ws, monkeypatch):
    ws, cfg = ws
    import tasks.fingerprint as fpm

    real = fpm.path_digest
    monkeypatch.setattr(fpm, "path_digest", lambda rel, *a: "edited" if rel == "tasks/stages/compress.py" else real(rel, *a))
    state = _run(ws, cfg, "r2")
    assert _how(state)["search"] == "reused" and _how(state)["compress"] == "ran"
    assert state["stages"]["compress"]["changed"] == "code of tasks/stages/compress.py changed"


def test_force_all_and_force_from_a_stage(ws):
    ws, cfg = ws
    run_paths("tiny", "r2", ws).update_state(force="compress")
    state = _run(ws, cfg, "r2")
    assert _how(state) == {"prepare_data": "reused", "train_base": "reused", "search": "reused",
                           "compress": "ran", "finetune": "ran"}
    assert state["stages"]["compress"]["changed"] == "forced"
    run_paths("tiny", "r3", ws).update_state(force=True)
    assert _how(_run(ws, cfg, "r3", stages=FAST[:2])) == {"prepare_data": "ran", "train_base": "ran"}
    # a single stage by hand (`shrinkflow stage ... --force`)
    rec = run_stage("train_base", "tiny", "r2", config_path=cfg, workspace=ws, force=True)
    assert rec["reused"] is False and rec["changed"] == "forced"


def test_resume_after_a_failure_continues_from_the_failed_stage(ws, monkeypatch):
    ws, cfg = ws
    import tasks.stages.compress as compress_mod
    from tasks.errors import StageError

    run_paths("tiny", "r2", ws).update_state(overrides={"train": {"lr": 0.04}})  # so r1 cannot be reused
    real = compress_mod.run
    monkeypatch.setattr(compress_mod, "run", lambda ctx, out: (_ for _ in ()).throw(StageError("boom")))
    with pytest.raises(StageError, match="boom"):
        _run(ws, cfg, "r2")
    paths = run_paths("tiny", "r2", ws)
    assert paths.read_state()["completed"] == ["prepare_data", "train_base", "search"]
    assert not paths.stage_dir("compress").exists()
    monkeypatch.setattr(compress_mod, "run", real)
    calls = []
    import tasks.stages.train_base as train_mod

    monkeypatch.setattr(train_mod, "run", lambda *a: calls.append("train_base"))
    before = paths.read_state()["stages"]["train_base"]
    state = _run(ws, cfg, "r2")
    assert calls == []  # not trained again
    assert state["stages"]["train_base"] == before
    assert state["completed"] == list(FAST) and _how(state)["compress"] == "ran"


def test_a_deleted_cached_folder_is_a_miss(ws):
    ws, cfg = ws
    shutil.rmtree(run_paths("tiny", "r1", ws).stage_dir("train_base"))
    state = _run(ws, cfg, "r2", stages=FAST[:2])
    assert _how(state) == {"prepare_data": "reused", "train_base": "ran"}
    assert "earlier output is gone" in state["stages"]["train_base"]["changed"]
    # a modified source folder is a miss too, and so is this run's own folder after an edit on disk
    (run_paths("tiny", "r2", ws).stage_dir("train_base") / "history.json").write_text("[]\n")
    state = _run(ws, cfg, "r2", stages=FAST[:2])
    assert state["stages"]["train_base"]["reused"] is False


def test_search_fanout_skips_when_the_search_will_be_reused(ws):
    ws, cfg = ws
    from tasks.stage_cache import stage_is_current
    from tasks.stages.search import setup, worker

    _run(ws, cfg, "r2", stages=FAST[:2])
    assert stage_is_current("search", "tiny", "r2", config_path=cfg, workspace=ws)
    assert setup("tiny", "r2", config_path=cfg, workspace=ws)["reused"] is True
    assert worker("tiny", "r2", 0, config_path=cfg, workspace=ws)["reused"] is True
    run_paths("tiny", "r2", ws).update_state(force="search")
    assert not stage_is_current("search", "tiny", "r2", config_path=cfg, workspace=ws)


def test_fingerprints_are_stable_across_processes(base_ws):
    ws, cfg = base_ws / "ws", base_ws / "p.yaml"
    code = textwrap.dedent(f"""
        import json
        from tasks.config import load_pipeline
        from tasks.stage_cache import decide
        from tasks.workspace import run_paths
        paths = run_paths("tiny", "r1", {str(ws)!r})
        state = paths.read_state()
        cfg = load_pipeline("tiny", {str(cfg)!r})
        print(json.dumps({{s: decide(s, cfg, paths, state, None).fp.digest for s in {list(FAST)!r}}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    recorded = {s: r["fingerprint"] for s, r in run_paths("tiny", "r1", ws).read_state()["stages"].items()}
    assert json.loads(out.stdout.strip().splitlines()[-1]) == recorded


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_a_new_data_version_reruns_from_prepare_data(tmp_path, monkeypatch):
    """fashion_mnist's identity is its idx files' content: a new file re-runs the chain."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()

    def write(seed_shift: int) -> None:
        y_tr, y_te = rng.integers(0, 10, 300), rng.integers(0, 10, 60)
        _write_idx(data / "train-images-idx3-ubyte.gz", (y_tr[:, None, None] * 20 + seed_shift) * np.ones((1, 8, 8)))
        _write_idx(data / "train-labels-idx1-ubyte.gz", y_tr)
        _write_idx(data / "t10k-images-idx3-ubyte.gz", (y_te[:, None, None] * 20 + seed_shift) * np.ones((1, 8, 8)))
        _write_idx(data / "t10k-labels-idx1-ubyte.gz", y_te)

    write(0)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(PIPELINE.replace("{source: synthetic, num_samples: 400, image_size: 8, num_classes: 4}",
                                    f"{{source: fashion_mnist, path: '{data}'}}"))
    ws = tmp_path / "ws"
    _run(ws, cfg, "a", stages=FAST[:2])
    assert _how(_run(ws, cfg, "b", stages=FAST[:2])) == {"prepare_data": "reused", "train_base": "reused"}
    write(3)  # a new version of the data set
    state = _run(ws, cfg, "c", stages=FAST[:2])
    assert _how(state) == {"prepare_data": "ran", "train_base": "ran"}
    assert state["stages"]["prepare_data"]["changed"] == "data changed"
    assert state["stages"]["train_base"]["changed"] == "upstream prepare_data changed"


def test_apply_overrides_dotted_and_nested(pipelines_file):
    from tasks.config import load_pipeline
    from tasks.errors import ConfigError
    from tasks.overrides import apply_overrides

    cfg = load_pipeline("synth")
    new = apply_overrides(cfg, {"goal": {"speedup": 2.5}, "finetune.distill.alpha": 0.5})
    assert (new.goal.speedup, new.goal.max_accuracy_drop, new.finetune.distill.alpha) == (2.5, 50.0, 0.5)
    assert new.name == "synth" and cfg.goal.speedup == 1.3
    with pytest.raises(ConfigError, match="goal.speedup"):
        apply_overrides(cfg, {"goal.speedup": 0.5})


@pytest.mark.slow
def test_cli_nightly_with_nothing_new_keeps_the_champion(ws, capsys):
    """The whole chain (TVM compile, benchmark, register) through `shrinkflow run --no-airflow`."""
    ws, cfg = ws
    from tasks.cli import main

    base = ["--workspace", str(ws), "--config", str(cfg), "run", "tiny", "--no-airflow"]
    assert main([*base, "--run-id", "n1"]) == 0  # compile, benchmark, register run; the rest is r1's
    capsys.readouterr()
    assert main([*base, "--run-id", "n2"]) == 0
    out = capsys.readouterr().out
    state = run_paths("tiny", "n2", ws).read_state()
    assert set(_how(state).values()) == {"reused"} and state["force"] is None
    assert "nothing changed; the champion stays" in out
    assert state["stages"]["register"]["reason"] == "nothing changed since run n1; the champion stays"
    assert main([*base, "--run-id", "n2", "--force", "benchmark"]) == 0
    state = run_paths("tiny", "n2", ws).read_state()
    assert state["force"] == "benchmark"
    assert _how(state) == {**{s: "reused" for s in STAGES[:6]}, "benchmark": "ran", "register": "ran"}
    assert main([*base, "--force", "nope"]) == 2
