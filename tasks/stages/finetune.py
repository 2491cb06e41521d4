"""Stage 4: apply the plan's training-time ops, fine-tune (distilling from the base model unless
switched off) with their constraints kept, apply post-training ops, and check the goal on the model
that will be deployed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from compression_ops import Distill, OpData, TrainSpec, evaluate, fit
from compression_ops.base import report_scalars, to_plain
from compression_ops.channel_prune import latency_reduction as eager_ratio
from compression_ops.coverage import coverage
from compression_ops.packing import pack_state_dict
from compression_ops.quantize import quantized_state_dict
from tasks.context import StageContext
from tasks.measure import measure_model
from tasks.models.checkpoint import save_checkpoint
from tasks.plan import apply_ops, ops_in_phase, plan_from_json
from tasks.progress import epoch_bar, say
from tasks.workspace import read_json, write_json


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    student, info = ctx.model("compress")
    teacher, _ = ctx.model("train_base")
    plan_json = read_json(ctx.paths.require("compress", "plan.json"))
    plan = plan_from_json(plan_json)
    distill = next((p for p in plan if isinstance(p, Distill)), None)
    fc = ctx.cfg.finetune
    chosen = read_json(ctx.paths.require("search", "choice.json"))
    lr = float(chosen.get("finetune", {}).get("lr", fc.lr))  # the search's learning rate, if it chose one
    sp = ctx.splits()
    data = OpData(example=ctx.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=16)
    student, hooks, reports = apply_ops(ctx.cfg, student, ops_in_phase(plan, "train"), data)
    spec = TrainSpec(epochs=fc.epochs, lr=lr, weight_decay=fc.weight_decay, schedule="cosine", seed=ctx.cfg.train.seed,
                     optimizer=fc.optimizer or ctx.cfg.train.optimizer)
    ctx.tracker.params({"finetune": {**fc.model_dump(), "lr": lr}, "distill": distill.to_dict() if distill else "off"})
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
        hooks=hooks,
    )
    reports += [{"op": "finetune_hook", **h.finish()} for h in hooks]
    student = to_plain(student).eval()

    # The deployed model: post-training ops (e.g. int8) applied to a copy; the checkpoint stays float so
    # the compile stage can export it and quantize the exported graph with the same settings.
    post = ops_in_phase(plan, "post")
    deployed, _, post_reports = apply_ops(ctx.cfg, copy.deepcopy(student), post, data)
    reports += post_reports
    # the whole plan's coverage of the base model: the compress stage's structural ops, then this stage's
    compressed = read_json(ctx.paths.require("compress", "report.json")).get("ops", [])
    cov = coverage(teacher, ctx.example(1), compressed + [r for r in reports if r.get("op") != "finetune_hook"])
    write_json(out / "coverage.json", cov)
    base = ctx.metrics("train_base")
    val = evaluate(deployed, sp.batches("val"))
    test = evaluate(deployed, sp.batches("test"))
    stats = measure_model(student, ctx.example(1))
    packed = pack_state_dict(quantized_state_dict(deployed))  # int codes when the plan quantizes
    (out / "model.packed").write_bytes(packed)
    goal = ctx.cfg.goal
    drop = base["test_accuracy"] - test["accuracy"]
    reduction = base["macs"] / max(stats["macs"], 1)
    met_acc = drop <= goal.max_accuracy_drop
    # base and compressed timed interleaved now: a ratio against the base's own figure from another
    # stage (another moment, another load) is not a measurement
    latency_reduction, _, stats["latency_b1_ms"] = eager_ratio(teacher, student, ctx.example(1), repeat=100)
    achieved = reduction if goal.metric == "macs" else latency_reduction
    met_speed = goal.speedup is None or achieved >= goal.speedup
    met_size = goal.size_mb is None or len(packed) / 1e6 <= goal.size_mb
    met_latency = goal.latency_ms is None or stats["latency_b1_ms"] <= goal.latency_ms
    # budget accounting, in epochs over the training split: the search's trials, the structural ops'
    # own training (channel_prune's regularize), this fine-tune
    train_n = len(sp.tensors["train"][1])
    search_images = int(chosen.get("budget", {}).get("train_images", 0))
    budget = {
        "budget_search_epochs": search_images / max(train_n, 1),
        "budget_compress_epochs": float(sum(r.get("train_epochs", 0) for r in compressed)),
        "budget_finetune_epochs": float(fc.epochs),
    }
    budget["budget_total_epochs"] = sum(budget.values())
    metrics = {
        "val_accuracy": val["accuracy"],
        "test_accuracy": test["accuracy"],
        "accuracy_drop": drop,
        "macs_reduction": reduction,
        "eager_latency_reduction": latency_reduction,
        "packed_bytes": len(packed),
        "post_training_ops": [op.op for op in post],
        "macs_covered_fraction": cov["macs_covered_fraction"],
        "goal_met": bool(met_acc and met_speed and met_size and met_latency),
        "goal_accuracy_met": bool(met_acc),
        "goal_speedup_met": bool(met_speed),
        "goal_size_met": bool(met_size),
        "goal_latency_met": bool(met_latency),
        **budget,
        **stats,
    }
    if post:
        metrics["test_accuracy_before_post_ops"] = evaluate(student, sp.batches("test"))["accuracy"]
    save_checkpoint(
        student,
        out / "model.pt",
        arch=info["arch"],
        input_shape=info["input_shape"],
        num_classes=info["num_classes"],
        meta={"stage": "finetune", "plan": plan_json},
    )
    write_json(out / "metrics.json", metrics)
    write_json(out / "report.json", {"ops": reports})
    ctx.tracker.metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
    for r in reports:
        ctx.tracker.metrics({f"{r['op']}.{k}": v for k, v in report_scalars(r).items()})
    ctx.tracker.artifact(out / "coverage.json")
    ctx.tracker.tags({"goal_met": str(metrics["goal_met"]).lower()}, on_parent=True)
    verdict = "met" if metrics["goal_met"] else "NOT met"
    how = f" ({' + '.join(op.op for op in post)}, simulated in PyTorch)" if post else ""
    say(
        f"compressed{how}: test accuracy {test['accuracy']:.2f}% (drop {drop:+.2f} pt, limit {goal.max_accuracy_drop}), "
        f"{reduction:.2f}x fewer MACs, {len(packed) / 1e3:.1f} kB packed: goal {verdict}"
    )
    return {"test_accuracy": test["accuracy"], "accuracy_drop": drop, "macs_reduction": reduction, "goal_met": metrics["goal_met"]}
