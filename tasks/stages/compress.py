"""Stage 3: scan the base model's layer sensitivity, then apply the plan's structural ops (pruning,
low-rank); the fine-tune stage applies the training-time and post-training ops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compression_ops import OpData, evaluate
from compression_ops.base import report_scalars
from tasks.models.checkpoint import save_checkpoint
from tasks.progress import say
from tasks.stages.context import StageContext
from tasks.stages.plan import apply_ops, ops_in_phase, plan_from_config, plan_to_json
from tasks.workspace import write_json


def _sensitivity(ctx: StageContext, model, data: OpData, out: Path) -> None:
    from compression_ops.sensitivity import prune_sensitivity, weight_bits_sensitivity
    from tasks.plots import plot_sensitivity

    sc = ctx.cfg.compression.sensitivity
    x, y = ctx.splits().tensors["val"]
    val = [(x[i : i + 500], y[i : i + 500]) for i in range(0, min(len(y), sc.val_images), 500)]

    def accuracy(m) -> float:
        return evaluate(m, val)["accuracy"]

    scans = [
        prune_sensitivity(model, data, accuracy, sc.prune_ratios),
        weight_bits_sensitivity(model, accuracy, sc.weight_bits),
    ]
    write_json(out / "sensitivity.json", {"val_images": sum(len(b[1]) for b in val), "scans": scans})
    plot_sensitivity(scans, out / "sensitivity.png", title=f"{ctx.cfg.name}: layer sensitivity (no fine-tuning)")
    ctx.tracker.artifact(out / "sensitivity.json")
    ctx.tracker.artifact(out / "sensitivity.png")
    worst = max(scans[0]["rows"], key=lambda r: r["drop"])
    say(f"sensitivity: most sensitive to pruning is {worst['layer']} ({worst['drop']:+.2f} pt at ratio {worst['setting']})")


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    model, info = ctx.model("train_base")
    sp = ctx.splits()
    plan = plan_from_config(ctx.cfg)
    data = OpData(example=ctx.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=8)
    if ctx.cfg.compression.sensitivity.enabled:
        _sensitivity(ctx, model, data, out)
    model, _, reports = apply_ops(ctx.cfg, model, ops_in_phase(plan, "structure"), data)
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
        ctx.tracker.metrics({f"{r['op']}.{k}": v for k, v in report_scalars(r).items()})
    ctx.tracker.artifact(out / "plan.json")
    return {"plan": [p["op"] for p in plan_json], "val_accuracy_before_finetune": val["accuracy"]}
