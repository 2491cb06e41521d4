"""Stage 7: register the compressed model as an MLflow Model (pyfunc) and decide, on equal terms with the
current champion, whether it takes over; write the run's report.

The gate (pipelines.yaml `promotion:`, tasks/gate.py) scores the challenger and the champion now, on this
run's test split and this host, through each one's deployed engine (tasks/champion.py); figures
recorded by earlier runs are not used. Decisions for one registered model are serialised by a lock.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tasks.champion import as_metrics, figures_table, side_by_side
from tasks.context import StageContext
from tasks.frontier import frontier_point
from tasks.gate import Decision, Figures, decide
from tasks.progress import say
from tasks.registry import (
    CHAMPION,
    alias_version,
    download_package,
    move_champion,
    registered_name,
    registry_lock,
)
from tasks.report import write_report
from tasks.serving import ENGINE_FILES, SERVING, Package, log_package, package_sha256, using_tracking_uri
from tasks.tracking import finish_parent, tracking_uri
from tasks.workspace import read_json, write_json

__all__ = ["registered_name", "run", "deployment"]

ARTIFACTS = ENGINE_FILES  # the file each engine loads, relative to the package


def deployment(ctx: StageContext) -> dict[str, dict[str, Any]]:
    """The engine to deploy per target and batch size: the fastest the benchmark measured, and its file."""
    bench = ctx.paths.stage_dir("benchmark") / "latency.json"
    if not bench.is_file():
        return {}
    best = read_json(bench).get("best", {})
    return {target: {b: {**v, "artifact": ARTIFACTS.get(v["engine"], "").format(target=target)}
                     for b, v in per.items()} for target, per in best.items()}


def build_package(ctx: StageContext, pkg: Path) -> None:
    """The package a device team downloads and the registered model serves: checkpoint, compiled
    artifacts, deploy.json, metrics.json, serving.json."""
    pkg.mkdir()
    shutil.copy2(ctx.paths.require("finetune", "model.pt"), pkg / "model.pt")
    compiled = ctx.paths.stage_dir("compile")
    if compiled.is_dir():
        # model.pt is the pytorch engine's copy of the checkpoint, already at the package's top
        shutil.copytree(compiled / "compressed", pkg / "compiled", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("model.pt"))
    write_json(pkg / "metrics.json", ctx.metrics("finetune"))
    deploy = deployment(ctx)
    if deploy:
        write_json(pkg / "deploy.json", deploy)
        for target, per in deploy.items():
            say(f"deploy on {target}: " + ", ".join(f"batch {b}: {v['engine']} ({v['artifact']})" for b, v in per.items()))
    info = ctx.data_info()
    write_json(pkg / SERVING, {
        "format": "shrinkflow.package/1", "input_shape": info["input_shape"], "num_classes": info["num_classes"],
        "classes": info.get("classes"), "mean": info["mean"], "std": info["std"], "data_hash": info["hash"],
        "threads": ctx.cfg.benchmark.threads, "pipeline": ctx.paths.pipeline, "run_id": ctx.paths.run_id,
        "input": "float32 [N, C, H, W] normalised with mean/std (params pixels=true: raw 0-255 pixel values)",
    })


def _latency_tags(ctx: StageContext) -> dict[str, str]:
    """The benchmark's fastest engine and time per target and batch, as version tags (latency_ms.<target>.b<batch>)."""
    return {f"latency_ms.{target}.b{b}": f"{v['median_ms']:.4g} ({v['engine']})"
            for target, per in deployment(ctx).items() for b, v in per.items()}


def _version(ctx: StageContext, client: Any, name: str, pkg: Path, digest: str, tags: dict[str, str]) -> Any:
    """This run's model version: the one a re-run of this stage already made for the same package, or a
    newly logged pyfunc model registered as a new version."""
    mine = client.search_model_versions(f"name = '{name}' and tags.shrinkflow_run_id = '{ctx.paths.run_id}'")
    same = [mv for mv in mine if mv.tags.get("package_sha256") == digest]
    if same:
        for k, v in tags.items():
            client.set_model_version_tag(name, same[0].version, k, v)
        return same[0]
    sp = ctx.splits()
    example = np.ascontiguousarray(sp.tensors["test"][0][:2].numpy())
    info = log_package(pkg, example, tracking_uri=tracking_uri(ctx.paths), run_id=ctx.tracker.parent_id,
                       tags={"shrinkflow_run_id": ctx.paths.run_id, "package_sha256": digest})
    with using_tracking_uri(tracking_uri(ctx.paths)):
        mv = client.create_model_version(name, source=info.model_uri, run_id=ctx.tracker.parent_id,
                                         tags={**tags, "package_sha256": digest}, model_id=info.model_id)
    for old in mine:  # this run's earlier version, for a package that has changed since
        client.set_model_version_tag(name, old.version, "superseded_by", str(mv.version))
    return mv


def _evaluate(ctx: StageContext, client: Any, name: str, pkg: Path, champ: Any,
              scratch: Path) -> tuple[dict[str, Figures], str | None]:
    """Figures of the challenger (and the champion, when there is one) measured now; an error message
    when the champion cannot be evaluated here."""
    rc, bc = ctx.cfg.promotion, ctx.cfg.benchmark
    sp = ctx.splits()
    pixels = sp.ds.x_test
    x, y = sp.tensors["test"][0].numpy(), sp.tensors["test"][1].numpy()
    packages = {"challenger": Package(pkg, threads=bc.threads)}
    problem = None
    if champ is not None:
        try:
            where = download_package(client, name, champ.version, scratch, tracking_uri(ctx.paths))
            packages["champion"] = Package(where, threads=bc.threads)
        except Exception as e:  # a champion whose artifacts are gone or unloadable: say so, decide nothing
            problem = f"{type(e).__name__}: {e}"
    try:
        figs = side_by_side(packages, pixels, x, y, batch=rc.latency_batch, threads=bc.threads,
                            warmup=rc.warmup, repeat=rc.repeat)
    except Exception as e:  # e.g. the champion takes another input shape than this run's data
        if "champion" not in packages:
            raise
        problem = f"{type(e).__name__}: {e}"
        packages.pop("champion")
        figs = side_by_side(packages, pixels, x, y, batch=rc.latency_batch, threads=bc.threads,
                            warmup=rc.warmup, repeat=rc.repeat)
    for k, p in packages.items():
        for f in p.fallbacks:
            say(f"{k}: engine {f['chosen']} cannot load here, measured with {f['used']} ({f['why']})")
    return figs, problem


def _record(ctx: StageContext, client: Any, name: str, mv: Any, champ: Any, figs: dict[str, Figures],
            decision: Decision, alias: str, out: Path, *, tag_version: bool = True) -> None:
    """decision.json, the stage run's tags/metrics and the version's tags (unless a re-run of a champion's
    stage, whose decision stands): both sets of figures."""
    rule = ctx.cfg.promotion
    doc = {
        "model": name, "version": str(mv.version), "alias": alias, "promoted": decision.promote,
        "reason": decision.reason, "checks": decision.checks, "rule": rule.model_dump(),
        "data_hash": ctx.data_info()["hash"], "test_images": int(len(ctx.splits().tensors["test"][1])),
        "challenger": {"version": str(mv.version), "run_id": ctx.paths.run_id, **vars(figs["challenger"])},
        "champion": None if champ is None else {
            "version": str(champ.version), "run_id": champ.tags.get("shrinkflow_run_id"),
            "recorded_test_accuracy": champ.tags.get("test_accuracy"),
            **(vars(figs["champion"]) if "champion" in figs else {"evaluated": False})},
    }
    write_json(out / "decision.json", doc)
    tr = ctx.tracker
    tr.artifact(out / "decision.json")
    tr.metrics(as_metrics(figs))
    tr.params({f"promotion.{k}": v for k, v in rule.model_dump().items()})
    tr.tags({"registry.alias": alias, "registry.reason": decision.reason, "registry.version": str(mv.version),
             "registry.promoted": str(decision.promote).lower(),
             "registry.champion_version": str(champ.version) if champ is not None else "none"})
    tr.tags({"registry_version": f"{name}/{mv.version}", "registry_alias": alias}, on_parent=True)
    tags = {"gate.promoted": str(decision.promote).lower(), "gate.reason": decision.reason[:4000],
            "gate.data_hash": doc["data_hash"], "gate.vs_version": str(champ.version) if champ is not None else "none",
            "gate.rule": f"cost={rule.cost} accuracy_tolerance={rule.accuracy_tolerance} "
                         f"latency_tolerance={rule.latency_tolerance} require_goal={rule.require_goal}"}
    tags.update({f"gate.{k}": f"{v:.6g}" for k, v in as_metrics(figs).items()})
    for k, v in tags.items() if tag_version else ():
        client.set_model_version_tag(name, mv.version, k, v)


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    fin = ctx.metrics("finetune")
    pkg = out / "model"
    build_package(ctx, pkg)
    write_report(ctx.paths, out / "report.md")
    tr = ctx.tracker
    tr.artifact(out / "report.md", on_parent=True)
    bench = ctx.paths.stage_dir("benchmark") / "latency.json"
    if bench.exists():
        tr.artifact(bench, on_parent=True)

    client = tr.client
    point = frontier_point(ctx.paths.read_state())  # a frontier point registers as its own model
    name = registered_name(ctx.paths.pipeline, point)
    try:
        client.get_registered_model(name)
    except Exception:  # MLflow raises for an unknown name; another worker may create it meanwhile
        try:
            what = f"the {point} point of pipeline {ctx.paths.pipeline}'s frontier" if point else f"pipeline {ctx.paths.pipeline}"
            client.create_registered_model(name, description=f"compressed models of {what}")
        except Exception:
            client.get_registered_model(name)
    tags = {"test_accuracy": f"{fin['test_accuracy']:.4f}", "macs": str(fin["macs"]),
            "goal_met": str(fin["goal_met"]).lower(), "shrinkflow_run_id": ctx.paths.run_id,
            "data_hash": ctx.data_info()["hash"], **_latency_tags(ctx)}
    if point:
        tags["frontier_point"] = point
    with registry_lock(ctx.paths.root, name), tempfile.TemporaryDirectory(dir=out) as scratch:
        mv = _version(ctx, client, name, pkg, package_sha256(pkg), tags)
        champ = alias_version(client, name, CHAMPION)
        rerun = champ is not None and str(champ.version) == str(mv.version)
        rival = None if rerun else champ
        figs, problem = _evaluate(ctx, client, name, pkg, rival, Path(scratch))
        if rerun:
            decision = Decision(False, "already the champion (stage re-run)")
        elif problem is not None:
            decision = Decision(False, f"champion version {champ.version} cannot be evaluated on this run's "
                                f"test split ({problem}); not promoted: fix its artifacts or move the alias "
                                "by hand (shrinkflow promote / rollback)")
        else:
            decision = decide(ctx.cfg.promotion, bool(fin["goal_met"]), figs["challenger"], figs.get("champion"))
        if decision.promote:
            move_champion(client, name, str(mv.version), action="register", reason=decision.reason,
                          by=f"register stage, run {ctx.paths.run_id}")
        elif not rerun:
            client.set_registered_model_alias(name, "challenger", str(mv.version))
        alias = CHAMPION if decision.promote or rerun else "challenger"
        _record(ctx, client, name, mv, rival, figs, decision, alias, out, tag_version=not rerun)
    say("champion/challenger on this run's test split, timed side by side on this host:\n" + figures_table(figs))
    finish_parent(ctx.paths)
    say(f"registered {name} version {mv.version} as {alias}: {decision.reason}")
    return {"model": name, "version": int(mv.version), "alias": alias, "reason": decision.reason,
            "promoted": decision.promote}
