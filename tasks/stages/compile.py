"""Stage 5: compile base and compressed models for every target (TVM), and export ONNX beside them.

Both are compiled so the benchmark compares them on the same engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.devices import get_device
from tasks.engines.onnx_runtime import export_onnx
from tasks.engines.tvm_build import build_tvm
from tasks.progress import say
from tasks.stages.context import StageContext
from tasks.workspace import write_json


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    models = {"base": ctx.model("train_base")[0], "compressed": ctx.model("finetune")[0]}
    example = ctx.example(1)
    summary: dict[str, Any] = {}
    for which, model in models.items():
        entry: dict[str, Any] = {"targets": {}}
        for name in ctx.cfg.targets:
            device = get_device(name)
            meta = build_tvm(model, example, device.tvm_target(), out / which / name,
                             batch_sizes=tuple(ctx.cfg.benchmark.batch_sizes),
                             cross_compiler=device.cross_compiler)
            entry["targets"][name] = meta
            if meta["max_abs_diff"] is None:  # cross-compiled: checked on the device by the benchmark
                say(f"TVM {which} for {name}: built (cross-compiled, not run here)")
                continue
            say(f"TVM {which} for {name}: max |diff| vs PyTorch {meta['max_abs_diff']:.2e}")
            ctx.tracker.metrics({f"{which}.{name}.tvm_max_abs_diff": meta["max_abs_diff"]})
        onnx_meta = export_onnx(model, example, out / which / "model.onnx")
        entry["onnx"] = onnx_meta
        ctx.tracker.metrics({f"{which}.onnx_max_abs_diff": onnx_meta["max_abs_diff"]})
        summary[which] = entry
    write_json(out / "compile.json", summary)
    ctx.tracker.artifact(out / "compile.json")
    ctx.tracker.params({"targets": ",".join(ctx.cfg.targets)})
    return {
        "targets": list(ctx.cfg.targets),
        "max_abs_diff": max(
            [m["max_abs_diff"] for e in summary.values() for m in e["targets"].values() if m["max_abs_diff"] is not None]
            + [e["onnx"]["max_abs_diff"] for e in summary.values()]
        ),
    }
