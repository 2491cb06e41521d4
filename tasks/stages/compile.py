"""Stage 5: build base and compressed models with every engine the pipeline's targets and the engine
registry allow (tasks/engines/__init__.py): the checkpoint for PyTorch, an ONNX export, its int8
quantization when the plan quantizes after training, a TVM library per CPU target (cross-compiled for
a device over RPC), an hls4ml project for an FPGA.

Both models are built so that the benchmark compares them on the same engine. compile.json lists every
planned build: (model, engine, target) with its path under this folder and the metadata its engine wrote,
or, where the engine cannot express the model (EngineUnsupported: TVM's importer lacks an op, the ONNX
exporter cannot convert Swin, hls4ml has no attention), `"skipped": "<reason>"` and no artifact. A skip is
logged, tagged on the MLflow run (`skipped.<model>.<engine>.<target>`), and the other engines still build.
Any other error (a wrong output, a missing compiler, a bug) still fails the stage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.context import StageContext
from tasks.devices import get_device, registry_of
from tasks.engines import Build, builds
from tasks.engines.base import BuildJob, EngineUnsupported
from tasks.plan import ops_in_phase
from tasks.progress import say
from tasks.workspace import write_json

# compile.json: {"format": 3, "artifacts": [row, ...]}; a row is {model, engine, target, path, meta} or,
# from format 3 on, {model, engine, target, "skipped": reason} (no path, no meta).
FORMAT = 3
SOURCE_STAGE = {"base": "train_base", "compressed": "finetune"}


def tuning_db(ctx: StageContext, device: str) -> Path:
    """The device's tuning database: compile.tuning.database, or .shrinkflow/tuning/<device>.json."""
    db = ctx.cfg.compile.tuning.database
    return Path(db.replace("{device}", device)) if db else ctx.paths.root / "tuning" / f"{device}.json"


def _int8_op(ctx: StageContext) -> Any | None:
    """The plan's post-training int8 quantization (its calibration settings), if it has one."""
    quant = [op for op in ops_in_phase(ctx.plan(), "post") if op.op == "quantize_int8"]
    return quant[-1] if quant else None


def planned_builds(ctx: StageContext, int8: Any | None) -> list[Build]:
    """What this pipeline builds: every (engine, model, device) its targets and benchmark.engines allow."""
    registry = registry_of(ctx.cfg)
    return builds(ctx.cfg.benchmark.engines, [get_device(n, registry) for n in ctx.cfg.targets],
                  get_device("host", registry), int8_plan=int8 is not None)


def _job(ctx: StageContext, b: Build, out: Path, models: dict[str, Any], int8: Any | None) -> BuildJob:
    cc = ctx.cfg.compile
    return BuildJob(
        model=models[b.model], example=ctx.example(1), device=b.device, out=out / b.path, root=out, which=b.model,
        checkpoint=ctx.paths.require(SOURCE_STAGE[b.model], "model.pt"),
        batch_sizes=tuple(ctx.cfg.benchmark.batch_sizes), pad_channels=cc.pad_channels,
        tuning_db=tuning_db(ctx, b.target), tuning_budget_s=cc.tuning.budget_s,
        calibration=(lambda: ctx.splits().tensors["train"][0][: 64 * int8.calib_batches].numpy()) if int8 else None,
        calibration_method=int8.calibration if int8 else "minmax",
        deployed=lambda: ctx.deployed_model(models[b.model]),
    )


def build_row(b: Build, job: BuildJob) -> dict[str, Any]:
    """compile.json's row for one planned build: its artifact, or a skip where the engine cannot express
    the model (nothing is left at its path then)."""
    row = {"model": b.model, "engine": b.engine.name, "target": b.target}
    try:
        meta = b.engine.build(job)
    except EngineUnsupported as e:
        _remove(job.out)
        say(f"{b.engine.name} {b.model} for {b.target}: skipped — {e}", logging.WARNING)
        return {**row, "skipped": str(e)}
    say(f"{b.engine.name} {b.model} for {b.target}: {b.engine.describe(meta)}")
    return {**row, "path": b.path, "meta": meta}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    models = {w: ctx.model(stage)[0] for w, stage in SOURCE_STAGE.items()}
    int8 = _int8_op(ctx)
    rows = [build_row(b, _job(ctx, b, out, models, int8)) for b in planned_builds(ctx, int8)]
    artifacts = [r for r in rows if "skipped" not in r]
    skipped = [r for r in rows if "skipped" in r]
    for r in skipped:
        # A tag per skip (a tag value holds the whole reason; a param would be cut and cannot change on a re-run).
        ctx.tracker.tags({f"skipped.{r['model']}.{r['engine']}.{r['target']}": r["skipped"][:5000]})
    for r in artifacts:
        meta, key = r["meta"], f"{r['model']}.{r['engine']}.{r['target']}"
        if meta.get("max_abs_diff") is not None:
            ctx.tracker.metrics({f"{key}.build_max_abs_diff": meta["max_abs_diff"]})
        if (meta.get("tuning") or {}).get("seconds") is not None:
            ctx.tracker.metrics({f"{key}.tuning_seconds": meta["tuning"]["seconds"]})
    write_json(out / "compile.json", {"format": FORMAT, "artifacts": rows})
    ctx.tracker.artifact(out / "compile.json")
    cc = ctx.cfg.compile
    ctx.tracker.params({"targets": ",".join(ctx.cfg.targets), "engines": ",".join(sorted({a["engine"] for a in artifacts})),
                        "tvm_tuning_budget_s": cc.tuning.budget_s, "tvm_pad_channels": cc.pad_channels})
    for name in ctx.cfg.targets:
        db = tuning_db(ctx, name)
        if db.is_file():
            ctx.tracker.artifact(db, "tuning")
    diffs = [a["meta"]["max_abs_diff"] for a in artifacts if a["meta"].get("max_abs_diff") is not None]
    return {"targets": list(ctx.cfg.targets), "artifacts": len(artifacts), "max_abs_diff": max(diffs, default=0.0),
            "skipped": [f"{r['engine']} {r['model']} for {r['target']}: {r['skipped']}" for r in skipped]}
