"""The compile and benchmark stages driven by the engine registry, on a pipeline whose targets are this
machine and a device over TVM RPC (a server of this machine's architecture on loopback): every engine
that serves a target is built, checked and timed the way it declares, and the device's figures feed
the search's latency cache."""

from __future__ import annotations

import json
import textwrap

import pytest

from tasks.stage_runner import run_stage
from tasks.stage_specs import STAGES
from tasks.workspace import run_paths

PIPELINE = textwrap.dedent(
    """
    pipelines:
      board:
        data: {source: synthetic, num_samples: 240, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 4}}
        train: {epochs: 1, batch_size: 32, lr: 0.05}
        goal: {speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}
        compression:
          sensitivity: {enabled: false}
          plan: [{op: channel_prune}, {op: quantize_int8, calibration: minmax}]
        finetune: {epochs: 1, batch_size: 32, lr: 0.01}
        targets: [host, board]
        compile: {tuning: {budget_s: 0}}
        benchmark: {batch_sizes: [1, 4], warmup: 1, repeat: 3, threads: 1, remote_repeat: 2, remote_number: 1}
    """
)


@pytest.fixture(scope="module")
def run(rpc_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    (root / "infra").mkdir()
    (root / "infra" / "devices.yaml").write_text(textwrap.dedent(f"""
        devices:
          host: {{target: {{kind: llvm, mcpu: native}}}}
          board:
            target: {{kind: llvm, mcpu: native}}
            rpc: {{host: 127.0.0.1, port: {rpc_server.port}, timeout_s: 30}}
        """))
    cfg = root / "pipelines.yaml"  # the device registry beside it is the project's
    cfg.write_text(PIPELINE)
    ws = root / "ws"
    for stage in STAGES[: STAGES.index("benchmark") + 1]:
        run_stage(stage, "board", "r1", config_path=cfg, workspace=ws)
    return ws, run_paths("board", "r1", ws), cfg


def test_compile_builds_what_the_registry_says_for_each_target(run):
    _, paths, _ = run
    doc = json.loads((paths.stage_dir("compile") / "compile.json").read_text())
    built = {(a["model"], a["engine"], a["target"]) for a in doc["artifacts"]}
    both = {(m, e, t) for m in ("base", "compressed") for e, t in
            [("pytorch", "host"), ("onnxruntime", "host"), ("tvm", "host"), ("tvm_rpc", "board")]}
    assert built == both | {("compressed", "onnxruntime_int8", "host")}
    for a in doc["artifacts"]:
        assert (paths.stage_dir("compile") / a["path"]).exists(), a["path"]


def test_benchmark_checks_and_times_the_device_over_rpc(run):
    _, paths, _ = run
    lat = json.loads((paths.stage_dir("benchmark") / "latency.json").read_text())
    board = [r for r in lat["rows"] if r["target"] == "board"]
    assert {(r["model"], r["engine"], r["batch"]) for r in board} == {
        (m, "tvm_rpc", b) for m in ("base", "compressed") for b in (1, 4)}
    assert all(r["median_ms"] > 0 and r["emulated"] is False for r in board)
    for c in (c for c in lat["checks"] if c["target"] == "board"):
        assert c["max_abs_diff_vs_pytorch"] < 1e-3 and c["top1_agreement_vs_pytorch"] == 1.0, c
    assert {(p["engine"], p["target"]) for p in lat["pairs"]} >= {("tvm_rpc", "board"), ("onnxruntime_int8", "host")}
    assert lat["best"]["board"]["1"]["engine"] == "tvm_rpc" and set(lat["best"]["host"]) == {"1", "4"}
    assert "board" in lat["best_vs_base_eager"]  # measured on a real CPU, not an emulator: comparable


def test_device_figures_feed_the_search(run):
    ws, _, _ = run
    cache = json.loads((ws / "cache" / "latency-board.json").read_text())
    (entry,) = [v for k, v in cache.items() if k.startswith("board:tvm_rpc:")]
    assert entry["source"] == "benchmark" and entry["latency_reduction"] > 0


def test_an_old_compile_json_is_refused_with_the_fix(run, tmp_path):
    """A compile folder from before the registry (format 1) is not guessed at: re-run compile."""
    from tasks.errors import ArtifactError

    ws, paths, cfg = run
    target = paths.stage_dir("compile") / "compile.json"
    kept = target.read_text()
    try:
        target.write_text(json.dumps({"base": {"targets": {}}, "compressed": {"targets": {}}}))
        with pytest.raises(ArtifactError, match="--force compile"):
            run_stage("benchmark", "board", "r1", config_path=cfg, workspace=ws, force=True)
    finally:
        target.write_text(kept)


def test_an_engine_that_cannot_express_the_model_is_a_recorded_skip(tmp_path):
    """EngineUnsupported becomes a compile.json row with the reason and no artifact; the benchmark's table
    says "tvm: skipped — <reason>" and that a target left without any engine measured nothing."""
    from tasks.devices import Device
    from tasks.engines import Build, Engine
    from tasks.engines.base import BuildJob, EngineUnsupported
    from tasks.latency.best import skipped_lines
    from tasks.latency.rows import Check, Skipped
    from tasks.stages.compile import build_row

    class Adapter:
        @staticmethod
        def build(job):
            (job.out / "model.so").parent.mkdir(parents=True)
            (job.out / "model.so").write_text("half-built")
            raise EngineUnsupported("TVM's PyTorch importer cannot translate M: it has no translation for ['i0.default']")

    engine = Engine("tvm", "unused", "{model}/{target}", "local", "float32", "interleaved")
    object.__setattr__(engine, "build", Adapter.build)  # the frozen dataclass's adapter, bypassed
    host = Device(name="host", target={"kind": "llvm"})
    b = Build(engine, "compressed", host)
    job = BuildJob(model=None, example=None, device=host, out=tmp_path / b.path, root=tmp_path)
    row = build_row(b, job)
    assert row == {"model": "compressed", "engine": "tvm", "target": "host",
                   "skipped": "TVM's PyTorch importer cannot translate M: it has no translation for ['i0.default']"}
    assert not (tmp_path / b.path).exists()  # nothing half-built is left

    skipped = [Skipped("compressed", "tvm", "host", row["skipped"]), Skipped("base", "tvm_rpc", "board", "no op")]
    checks = [Check("compressed", "pytorch", "host", 10, 90.0, 0.0, 1.0)]
    text = skipped_lines(skipped, checks)
    assert "tvm: skipped — TVM's PyTorch importer cannot translate M" in text
    assert "NOTHING MEASURED for the base model on target 'board': tvm_rpc, its only engine, was skipped" in text
    assert "target 'host'" not in text  # PyTorch measured the host
