"""Stage 5: compile base and compressed models for every target (TVM), and export ONNX beside them.

Both are compiled so the benchmark compares them on the same engine. When the plan quantizes to int8
after training, the compressed ONNX graph is quantized (QDQ, calibrated as the plan says) into
model.int8.onnx, which ONNX Runtime executes with int8 kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.devices import get_device, registry_of
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


def deployed_model(ctx: StageContext, model: Any) -> Any:
    """The fine-tuned model with the plan's post-training ops (int8) applied, as the finetune stage
    scored it (same calibration batches): the quantized PyTorch model the FPGA flow implements."""
    import copy

    from compression_ops import OpData
    from tasks.stages.plan import apply_ops

    post = ops_in_phase(plan_from_json(read_json(ctx.paths.require("compress", "plan.json"))), "post")
    if not post:
        return model
    sp = ctx.splits()
    data = OpData(example=ctx.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=16)
    return apply_ops(ctx.cfg, copy.deepcopy(model), post, data, quiet=True)[0].eval()


def _fpga(ctx: StageContext, model: Any, example: Any, out: Path, device: Any) -> dict[str, Any]:
    """The quantized model as an hls4ml project with its C simulation compiled (no vendor tools)."""
    from tasks.engines.fpga import build_hls, estimate_resources

    say(f"FPGA ({device.name}): generating the hls4ml project and compiling its C simulation ...")
    meta = build_hls(deployed_model(ctx, model), example, out, **device.hls_options())
    est = estimate_resources(out)
    meta["estimate"] = est
    say(f"FPGA {device.name}: project in {out} ({meta.get('build_seconds', 0):.0f} s); estimated "
        f"{estimate_line(est)}; synthesis needs AMD Vitis HLS / Vivado (not run)")
    return meta


def estimate_line(est: dict[str, Any]) -> str:
    """One line of an FPGA estimate: DSPs, BRAM, latency range and throughput."""
    t = est["totals"]
    lo, hi = est["latency_us"]
    tput = est.get("throughput_images_per_s")
    return (f"{t['dsp']} DSP, {t['bram18']} BRAM18, latency {lo:.1f}-{hi:.1f} us at "
            f"{1000 / est['clock_period_ns']:.0f} MHz" + (f", {tput:,.0f} images/s" if tput else ""))


def host_lanes(registry: Path | None = None) -> int:
    """float32 lanes of this machine's vector registers (8 on AVX2, 16 on AVX-512)."""
    import tvm

    from tasks.engines.tvm_schedule import vector_lanes

    return vector_lanes(tvm.target.Target(get_device("host", registry).tvm_target()))


def tuning_db(ctx: StageContext, device: str) -> Path:
    """The device's tuning database: compile.tuning.database, or .shrinkflow/tuning/<device>.json."""
    db = ctx.cfg.compile.tuning.database
    return Path(db.replace("{device}", device)) if db else ctx.paths.root / "tuning" / f"{device}.json"


def _tuning_line(meta: dict[str, Any]) -> str:
    t = meta.get("tuning")
    if not t:
        return "default schedule"
    if not meta.get("verified_on_host"):  # cross-compiled: nothing can be timed here
        return f"default knobs (tuning times kernels on this CPU only), {t['from_db']} kernels from the database"
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
            device = get_device(name, registry_of(ctx.cfg))
            if device.is_fpga:
                if which == "compressed":
                    entry["targets"][name] = _fpga(ctx, model, example, out / which / name, device)
                continue
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
        onnx_model, onnx_pad = (pad_channels(model, example, host_lanes(registry_of(ctx.cfg))) if cc.pad_channels
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
            [m["max_abs_diff"] for e in summary.values() for m in e["targets"].values() if m.get("max_abs_diff") is not None]
            + [e["onnx"]["max_abs_diff"] for e in summary.values()]
        ),
    }
