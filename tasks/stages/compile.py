"""Stage 5: compile base and compressed models for every target (TVM), and export ONNX beside them.

Both are compiled so the benchmark compares them on the same engine. When the plan quantizes to int8
after training, the compressed ONNX graph is quantized (QDQ, calibrated as the plan says) into
model.int8.onnx, which ONNX Runtime executes with int8 kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.devices import get_device
from tasks.engines.onnx_int8 import quantize_onnx_int8
from tasks.engines.onnx_runtime import export_onnx
from tasks.engines.pad_channels import pad_channels
from tasks.engines.tvm_build import build_tvm
from tasks.progress import say
from tasks.stages.context import StageContext
from tasks.stages.plan import ops_in_phase, plan_from_json
from tasks.workspace import read_json, write_json


def _int8(ctx: StageContext, out: Path) -> dict[str, Any] | None:
    plan = plan_from_json(read_json(ctx.paths.require("compress", "plan.json")))
    quant = [op for op in ops_in_phase(plan, "post") if op.op == "quantize_int8"]
    if not quant:
        return None
    q = quant[-1]
    calib = ctx.splits().tensors["train"][0][: 64 * q.calib_batches].numpy()
    meta = quantize_onnx_int8(out / "compressed" / "model.onnx", out / "compressed" / "model.int8.onnx", calib,
                              method=q.calibration)
    say(f"ONNX int8 (QDQ, {q.calibration} calibration): {meta['file_bytes'] / 1e3:.1f} kB, "
        f"top-1 agreement with fp32 {meta['top1_agreement']:.3f}")
    return meta


def host_lanes() -> int:
    """float32 lanes of this machine's vector registers (8 on AVX2, 16 on AVX-512)."""
    import tvm

    from tasks.engines.tvm_schedule import vector_lanes

    return vector_lanes(tvm.target.Target(get_device("host").tvm_target()))


def tuning_db(ctx: StageContext, device: str) -> Path:
    """The device's tuning database: compile.tuning.database, or .shrinkflow/tuning/<device>.json."""
    db = ctx.cfg.compile.tuning.database
    return Path(db.replace("{device}", device)) if db else ctx.paths.root / "tuning" / f"{device}.json"


def _tuning_line(meta: dict[str, Any]) -> str:
    t = meta.get("tuning")
    if not t:
        return "default schedule"
    return (f"tuned {t['tuned']} kernels in {t['seconds']:.0f} s, {t['from_db']} from the database"
            + (f", {t['left_default']} left at defaults (budget spent)" if t["left_default"] else ""))


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    models = {"base": ctx.model("train_base")[0], "compressed": ctx.model("finetune")[0]}
    example = ctx.example(1)
    cc = ctx.cfg.compile
    summary: dict[str, Any] = {}
    for which, model in models.items():
        entry: dict[str, Any] = {"targets": {}}
        for name in ctx.cfg.targets:
            device = get_device(name)
            meta = build_tvm(model, example, device.tvm_target(), out / which / name,
                             batch_sizes=tuple(ctx.cfg.benchmark.batch_sizes),
                             cross_compiler=device.cross_compiler,
                             pad_channels=cc.pad_channels,
                             tuning_db=tuning_db(ctx, name),
                             tuning_budget_s=cc.tuning.budget_s)
            entry["targets"][name] = meta
            padded = meta["channel_padding"]
            grown = ", ".join(f"{g['from']}->{g['to']}" for g in padded.get("groups", []))
            widths = f", channels padded to multiples of {padded['multiple']} ({grown})" if padded.get("padded") else ""
            if meta["max_abs_diff"] is None:  # cross-compiled: checked on the device by the benchmark
                say(f"TVM {which} for {name}: built (cross-compiled, not run here; {_tuning_line(meta)}{widths})")
                continue
            say(f"TVM {which} for {name}: max |diff| vs PyTorch {meta['max_abs_diff']:.2e}; "
                f"{_tuning_line(meta)}{widths}")
            ctx.tracker.metrics({f"{which}.{name}.tvm_max_abs_diff": meta["max_abs_diff"]})
            if meta.get("tuning"):
                ctx.tracker.metrics({f"{which}.{name}.tvm_tuning_seconds": meta["tuning"]["seconds"]})
        # ONNX Runtime's CPU kernels block channels by the vector width too: padded pruned widths ran
        # its fp32 model 1.4-1.7x and its int8 model 1.6-2.2x faster at batch 32 here (exact zeros).
        onnx_model, onnx_pad = (pad_channels(model, example, host_lanes()) if cc.pad_channels
                                else (model, {"padded": False}))
        onnx_meta = export_onnx(onnx_model, example, out / which / "model.onnx")
        onnx_meta["channel_padding"] = onnx_pad
        entry["onnx"] = onnx_meta
        ctx.tracker.metrics({f"{which}.onnx_max_abs_diff": onnx_meta["max_abs_diff"]})
        summary[which] = entry
    int8 = _int8(ctx, out)
    if int8 is not None:
        summary["compressed"]["onnx_int8"] = int8
        ctx.tracker.metrics({"compressed.onnx_int8_top1_agreement": int8["top1_agreement"]})
    write_json(out / "compile.json", summary)
    ctx.tracker.artifact(out / "compile.json")
    ctx.tracker.params({"targets": ",".join(ctx.cfg.targets), "tvm_tuning_budget_s": cc.tuning.budget_s,
                        "tvm_pad_channels": cc.pad_channels})
    for name in ctx.cfg.targets:
        db = tuning_db(ctx, name)
        if db.is_file():
            ctx.tracker.artifact(db, "tuning")
    return {
        "targets": list(ctx.cfg.targets),
        "max_abs_diff": max(
            [m["max_abs_diff"] for e in summary.values() for m in e["targets"].values() if m["max_abs_diff"] is not None]
            + [e["onnx"]["max_abs_diff"] for e in summary.values()]
        ),
    }
