"""Stage 7: register the compressed model in the MLflow registry behind a champion/challenger gate, and
write the run's report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tasks.progress import say
from tasks.report import write_report
from tasks.stages.context import StageContext
from tasks.tracking import finish_parent
from tasks.workspace import read_json, write_json


def registered_name(pipeline: str) -> str:
    return f"shrinkflow-{pipeline}"


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except Exception:  # no champion yet (MLflow raises for an unknown alias)
        return None


def gate(new: dict[str, Any], champion_tags: dict[str, str] | None) -> tuple[str, str]:
    """Champion if the goal is met and it is at least as accurate as the current champion."""
    if not new["goal_met"]:
        return "challenger", "goal not met"
    if champion_tags is None:
        return "champion", "first model to meet the goal"
    old = float(champion_tags.get("test_accuracy", "-inf"))
    if round(new["test_accuracy"], 4) >= old:  # tags hold 4 decimals
        return "champion", f"test accuracy {new['test_accuracy']:.2f}% >= champion's {old:.2f}%"
    return "challenger", f"test accuracy {new['test_accuracy']:.2f}% < champion's {old:.2f}%"


ARTIFACTS = {"tvm": "compiled/{target}/model.so", "onnxruntime": "compiled/model.onnx",
             "onnxruntime_int8": "compiled/model.int8.onnx", "pytorch": "model.pt"}


def deployment(ctx: StageContext) -> dict[str, dict[str, Any]]:
    """The engine to deploy per target and batch size: the fastest the benchmark measured, and its file."""
    bench = ctx.paths.stage_dir("benchmark") / "latency.json"
    if not bench.is_file():
        return {}
    best = read_json(bench).get("best", {})
    return {target: {b: {**v, "artifact": ARTIFACTS.get(v["engine"], "").format(target=target)}
                     for b, v in per.items()} for target, per in best.items()}


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    fin = ctx.metrics("finetune")
    # The package a device team downloads: checkpoint, ONNX, TVM libraries, their metadata.
    pkg = out / "model"
    pkg.mkdir()
    shutil.copy2(ctx.paths.require("finetune", "model.pt"), pkg / "model.pt")
    compiled = ctx.paths.stage_dir("compile")
    if compiled.is_dir():
        shutil.copytree(compiled / "compressed", pkg / "compiled", dirs_exist_ok=True)
    write_json(pkg / "metrics.json", fin)
    deploy = deployment(ctx)
    if deploy:
        write_json(pkg / "deploy.json", deploy)
        for target, per in deploy.items():
            say(f"deploy on {target}: " + ", ".join(f"batch {b}: {v['engine']} ({v['artifact']})" for b, v in per.items()))
    write_report(ctx.paths, out / "report.md")
    tr = ctx.tracker
    tr.artifact(pkg, "model", on_parent=True)
    tr.artifact(out / "report.md", on_parent=True)
    bench = ctx.paths.stage_dir("benchmark") / "latency.json"
    if bench.exists():
        tr.artifact(bench, on_parent=True)

    client = tr.client
    name = registered_name(ctx.paths.pipeline)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description=f"compressed models of pipeline {ctx.paths.pipeline}")
    parent = client.get_run(tr.parent_id)
    tags = {
        "test_accuracy": f"{fin['test_accuracy']:.4f}",
        "macs": str(fin["macs"]),
        "goal_met": str(fin["goal_met"]).lower(),
        "shrinkflow_run_id": ctx.paths.run_id,
    }
    # A re-run of this stage for the same run updates its version instead of adding another.
    mine = client.search_model_versions(f"name = '{name}' and tags.shrinkflow_run_id = '{ctx.paths.run_id}'")
    if mine:
        mv = mine[0]
        for k, v in tags.items():
            client.set_model_version_tag(name, mv.version, k, v)
    else:
        mv = client.create_model_version(
            name, source=f"{parent.info.artifact_uri}/model", run_id=tr.parent_id, tags=tags
        )
    champ = _champion(client, name)
    if champ is not None and champ.version == mv.version:
        alias, why = "champion", "already the champion (stage re-run)"
    else:
        alias, why = gate(fin, dict(champ.tags) if champ is not None else None)
    client.set_registered_model_alias(name, alias, mv.version)
    tr.tags({"registry.alias": alias, "registry.reason": why, "registry.version": mv.version})
    tr.tags({"registry_version": f"{name}/{mv.version}", "registry_alias": alias}, on_parent=True)
    finish_parent(ctx.paths)
    say(f"registered {name} version {mv.version} as {alias}: {why}")
    return {"model": name, "version": int(mv.version), "alias": alias, "reason": why}
