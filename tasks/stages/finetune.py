"""Stage 4: fine-tune the compressed model, distilling from the base model as teacher; check the goal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compression_ops import Distill, TrainSpec, evaluate, fit
from tasks.models.checkpoint import save_checkpoint
from tasks.progress import epoch_bar, say
from tasks.stages.context import StageContext
from tasks.stages.measure import measure_model
from tasks.stages.plan import plan_from_json
from tasks.workspace import read_json, write_json


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    student, info = ctx.model("compress")
    teacher, _ = ctx.model("train_base")
    plan = plan_from_json(read_json(ctx.paths.require("compress", "plan.json")))
    distill = next((p for p in plan if isinstance(p, Distill)), None)
    fc = ctx.cfg.finetune
    sp = ctx.splits()
    spec = TrainSpec(epochs=fc.epochs, lr=fc.lr, weight_decay=fc.weight_decay, schedule="cosine", seed=ctx.cfg.train.seed)
    ctx.tracker.params({"finetune": fc.model_dump(), "distill": distill.to_dict() if distill else "off"})
    fit(
        student,
        sp.batches("train", fc.batch_size, train=True, augment=ctx.cfg.train.augment, seed=ctx.cfg.train.seed + 1),
        spec,
        teacher=teacher if distill else None,
        distill=distill,
        val=sp.batches("val"),
        wrap_epoch=epoch_bar("finetune", fc.epochs),
        on_epoch=lambda e, row: (
            ctx.tracker.metrics(row, step=e),
            say(f"finetune epoch {e}: val accuracy {row['val_accuracy']:.2f}%"),
        ),
    )
    base = ctx.metrics("train_base")
    val = evaluate(student, sp.batches("val"))
    test = evaluate(student, sp.batches("test"))
    stats = measure_model(student, ctx.example(1))
    goal = ctx.cfg.goal
    drop = base["test_accuracy"] - test["accuracy"]
    reduction = base["macs"] / max(stats["macs"], 1)
    met_acc = drop <= goal.max_accuracy_drop
    met_speed = goal.speedup is None or reduction >= goal.speedup
    metrics = {
        "val_accuracy": val["accuracy"],
        "test_accuracy": test["accuracy"],
        "accuracy_drop": drop,
        "macs_reduction": reduction,
        "goal_met": bool(met_acc and met_speed),
        "goal_accuracy_met": bool(met_acc),
        "goal_speedup_met": bool(met_speed),
        **stats,
    }
    save_checkpoint(
        student,
        out / "model.pt",
        arch=info["arch"],
        input_shape=info["input_shape"],
        num_classes=info["num_classes"],
        meta={"stage": "finetune", "plan": read_json(ctx.paths.require("compress", "plan.json"))},
    )
    write_json(out / "metrics.json", metrics)
    ctx.tracker.metrics({k: float(v) for k, v in metrics.items()})
    ctx.tracker.tags({"goal_met": str(metrics["goal_met"]).lower()}, on_parent=True)
    verdict = "met" if metrics["goal_met"] else "NOT met"
    say(
        f"compressed: test accuracy {test['accuracy']:.2f}% (drop {drop:+.2f} pt, limit {goal.max_accuracy_drop}), "
        f"{reduction:.2f}x fewer MACs: goal {verdict}"
    )
    return {"test_accuracy": test["accuracy"], "accuracy_drop": drop, "macs_reduction": reduction, "goal_met": metrics["goal_met"]}
