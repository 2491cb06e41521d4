"""Stage 3: apply the plan's structural ops to the base model (fine-tuning comes next)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compression_ops import OpData, apply, evaluate
from compression_ops.base import OpConfigError
from tasks.errors import ConfigError
from tasks.models.checkpoint import save_checkpoint
from tasks.progress import say
from tasks.stages.context import StageContext
from tasks.stages.plan import plan_from_config, plan_to_json
from tasks.workspace import write_json


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    model, info = ctx.model("train_base")
    sp = ctx.splits()
    try:
        plan = plan_from_config(ctx.cfg)
    except OpConfigError as e:
        raise ConfigError(f"pipeline {ctx.cfg.name!r}: invalid compression setting: {e}") from e
    data = OpData(example=ctx.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=8)
    reports = []
    for op in plan:
        if op.op == "distill":  # consumed by the fine-tune stage
            continue
        try:
            res = apply(model, op, data)
        except OpConfigError as e:
            raise ConfigError(f"pipeline {ctx.cfg.name!r}: {op.op} cannot run: {e}") from e
        model = res.model
        reports.append(res.report)
        say(f"{op.op}: {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in res.report.items() if k != 'op')}")
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
    ctx.tracker.params({"plan": {f"{i}_{p['op']}": p for i, p in enumerate(plan_json)}})
    ctx.tracker.metrics({"val_accuracy_before_finetune": val["accuracy"]})
    for r in reports:
        ctx.tracker.metrics({f"{r['op']}.{k}": v for k, v in r.items() if k != "op"})
    ctx.tracker.artifact(out / "plan.json")
    return {"plan": [p["op"] for p in plan_json], "val_accuracy_before_finetune": val["accuracy"]}
