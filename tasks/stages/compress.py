"""Stage 4: apply the chosen plan's structural ops (pruning, low-rank) to the base model; the fine-tune
stage applies the training-time and post-training ops. The plan is the search stage's choice (or, with
no search, the goal-solved plan of pipelines.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compression_ops import OpData, evaluate
from compression_ops.base import report_scalars
from compression_ops.coverage import coverage
from tasks.context import StageContext
from tasks.models.checkpoint import save_checkpoint
from tasks.plan import apply_ops, ops_in_phase, plan_from_json, plan_to_json
from tasks.workspace import read_json, write_json


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    model, info = ctx.model("train_base")
    sp = ctx.splits()
    plan = plan_from_json(read_json(ctx.paths.require("search", "plan.json")))
    data = OpData(example=ctx.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=8)
    base = model
    model, _, reports = apply_ops(ctx.cfg, model, ops_in_phase(plan, "structure"), data)
    cov = coverage(base, data.example, reports)
    write_json(out / "coverage.json", cov)
    val = evaluate(model, sp.batches("val"))
    plan_json = plan_to_json(plan)
    write_json(out / "plan.json", plan_json)
    write_json(out / "report.json", {"ops": reports, "val_accuracy_before_finetune": val["accuracy"]})
    save_checkpoint(
        model,
        out / "model.pt",
        arch=info["arch"],
        input_shape=info["input_shape"],
        num_classes=info["num_classes"],
        meta={"stage": "compress", "plan": plan_json},
    )
    ctx.tracker.params({"plan": {f"{i}_{p.op}": p.to_dict() for i, p in enumerate(plan)}})
    ctx.tracker.metrics({"val_accuracy_before_finetune": val["accuracy"], "macs_covered_fraction": cov["macs_covered_fraction"]})
    for r in reports:
        ctx.tracker.metrics({f"{r['op']}.{k}": v for k, v in report_scalars(r).items()})
    ctx.tracker.artifact(out / "plan.json")
    ctx.tracker.artifact(out / "coverage.json")
    return {
        "plan": [p.op for p in plan],
        "val_accuracy_before_finetune": val["accuracy"],
        "macs_covered_fraction": cov["macs_covered_fraction"],
        "reverted": [r["op"] for r in reports if r.get("reverted")],
    }
