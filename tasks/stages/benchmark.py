"""Stage 6: base vs compressed on every engine and target device, side by side.

Each compiled artifact is first checked against PyTorch (max |diff| of logits, top-1 agreement and
accuracy on the test split; on an RPC device, on the first `remote_check_images` test images), then
timed at each batch size: engines on this machine interleaved in one process with the same thread
count; a device behind TVM RPC with TVM's time_evaluator on the device (figures from the emulated
ARM device are flagged `emulated` and are qemu's speed, not an ARM CPU's).

The result is a table per target and engine (median and p90 at every batch size, the output check,
the artifact's size), the fastest engine per target for the compressed model (`best`), and the
device-measured latency ratios, written back to the latency cache the search reads
(hardware-in-the-loop: the next search on the same architectures uses these figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.devices import Device, get_device, registry_of
from tasks.engines.onnx_runtime import load_onnx
from tasks.engines.pytorch_eager import TorchRunner
from tasks.engines.timing import set_threads, time_interleaved
from tasks.engines.tvm_build import load_tvm
from tasks.progress import say
from tasks.report import render_table
from tasks.stages.compile import deployed_model, estimate_line
from tasks.stages.context import StageContext
from tasks.workspace import write_json

MODELS = ("base", "compressed")


def _runners(ctx: StageContext, threads: int) -> dict[tuple[str, str, str], Any]:
    """(model, engine, target) -> runner with .run(np.ndarray) -> np.ndarray, for every local engine."""
    compiled = ctx.paths.stage_dir("compile")
    models = {"base": ctx.model("train_base")[0], "compressed": ctx.model("finetune")[0]}
    engines = ctx.cfg.benchmark.engines
    out: dict[tuple[str, str, str], Any] = {}
    for which in MODELS:
        if "pytorch" in engines:
            out[(which, "pytorch", "host")] = TorchRunner(models[which])
        if "onnxruntime" in engines:
            out[(which, "onnxruntime", "host")] = load_onnx(ctx.paths.require("compile", f"{which}/model.onnx"), threads)
            int8 = compiled / which / "model.int8.onnx"
            if int8.is_file():  # the plan quantized the compressed model: its deployable form
                out[(which, "onnxruntime_int8", "host")] = load_onnx(int8, threads)
        if "tvm" in engines:
            for name in ctx.cfg.targets:
                device = get_device(name, registry_of(ctx.cfg))
                if device.rpc is None and not device.is_fpga:  # RPC devices: _remote; FPGA: _fpga
                    out[(which, "tvm", name)] = load_tvm(compiled / which / name)
    return out


def _remote_devices(ctx: StageContext) -> list[Device]:
    if "tvm" not in ctx.cfg.benchmark.engines:
        return []
    return [d for d in (get_device(n, registry_of(ctx.cfg)) for n in ctx.cfg.targets) if d.rpc is not None and not d.is_fpga]


def _fpga(ctx: StageContext, device: Device, x_test: np.ndarray, y_test: np.ndarray,
          ref: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """The FPGA C simulation against the quantized PyTorch model on the test split, and its estimate."""
    from tasks.engines.fpga import agreement, estimate_resources, load_hls

    d = ctx.paths.stage_dir("compile") / "compressed" / device.name
    n = min(len(x_test), ctx.cfg.benchmark.remote_check_images)  # the C simulation is slow (ms per image)
    say(f"FPGA {device.name}: bit-accurate C simulation on {n} test images ...")
    a = agreement(load_hls(d), ref[:n], x_test[:n], y_test[:n])
    check = {"model": "compressed", "engine": "hls_csim", "target": device.name, "images": a["n"],
             "test_accuracy": a["accuracy"], "max_abs_diff_vs_pytorch": a["max_abs_diff_logits"],
             "top1_agreement_vs_pytorch": a["top1_agreement"], "seconds_per_image": a["seconds_per_image"]}
    return check, estimate_resources(d)


def _remote(ctx: StageContext, device: Device, x_test: np.ndarray, y_test: np.ndarray,
            ref: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check and time base and compressed on a device over TVM RPC: (check rows, latency rows)."""
    from tasks.engines.tvm_rpc import RemoteTVMRunner

    bc = ctx.cfg.benchmark
    compiled = ctx.paths.stage_dir("compile")
    n = min(len(x_test), bc.remote_check_images)
    checks, rows = [], []
    for which in MODELS:
        say(f"{which} on device {device.name!r} over TVM RPC ({device.rpc.host}:{device.rpc.port}) ...")
        with RemoteTVMRunner.for_device(compiled / which / device.name, device) as r:
            batch = max(bc.batch_sizes)
            lg = _logits(r, x_test[:n], batch)
            checks.append(_check_row(which, "tvm", device.name, lg, y_test[:n], ref[which][:n]))
            for b in bc.batch_sizes:
                # repeat samples of `number` calls each, timed on the device (emulated: ~1 s a call)
                st = r.time(np.ascontiguousarray(x_test[:b]), number=bc.remote_number, repeat=bc.remote_repeat,
                            warmup=min(bc.warmup, 2))
                rows.append({"model": which, "engine": "tvm", "target": device.name, "batch": b,
                             **{k: st[k] for k in ("median_ms", "p90_ms", "mean_ms", "min_ms")},
                             "emulated": st.get("emulated")})
    return checks, rows


def _check_row(which: str, engine: str, target: str, lg: np.ndarray, y: np.ndarray,
               ref: np.ndarray | None) -> dict[str, Any]:
    return {
        "model": which,
        "engine": engine,
        "target": target,
        "images": int(len(lg)),
        "test_accuracy": float(100.0 * (lg.argmax(1) == y[: len(lg)]).mean()),
        "max_abs_diff_vs_pytorch": float(np.abs(lg - ref[: len(lg)]).max()) if ref is not None else None,
        "top1_agreement_vs_pytorch": float((lg.argmax(1) == ref[: len(lg)].argmax(1)).mean()) if ref is not None else None,
    }


def _logits(runner: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """runner's outputs for all of x, in batches of `batch`."""
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)])


def _check(runners: dict, x_test: np.ndarray, y_test: np.ndarray, batch: int,
           ref: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Accuracy of every runner on the test split, and agreement with PyTorch on the same model.

    int8 is compared with float PyTorch: the agreement shows what quantization changed. PyTorch's
    own logits are the reference already computed, not a second pass over the test split.
    """
    rows = []
    for (which, engine, target), r in runners.items():
        lg = ref[which] if engine == "pytorch" else _logits(r, x_test, batch)
        rows.append(_check_row(which, engine, target, lg, y_test, ref.get(which)))
    return rows


def _sizes(ctx: StageContext) -> dict[tuple[str, str, str], int]:
    """Bytes of each deployable artifact by (model, engine, target)."""
    compiled = ctx.paths.stage_dir("compile")
    sizes: dict[tuple[str, str, str], int] = {}
    for which in MODELS:
        for name in ctx.cfg.targets:
            lib = compiled / which / name / "model.so"
            if lib.is_file():
                sizes[(which, "tvm", name)] = lib.stat().st_size
        for engine, file in (("onnxruntime", "model.onnx"), ("onnxruntime_int8", "model.int8.onnx")):
            if (compiled / which / file).is_file():
                sizes[(which, engine, "host")] = (compiled / which / file).stat().st_size
    return sizes


def _best(rows: list[dict[str, Any]], batch_sizes: list[int]) -> dict[str, dict[str, Any]]:
    """The fastest engine for the compressed model per target and batch size."""
    best: dict[str, dict[str, Any]] = {}
    for target in sorted({r["target"] for r in rows}):
        best[target] = {}
        for b in batch_sizes:
            mine = [r for r in rows if r["model"] == "compressed" and r["target"] == target and r["batch"] == b]
            if mine:
                r = min(mine, key=lambda r: r["median_ms"])
                best[target][str(b)] = {"engine": r["engine"], "median_ms": r["median_ms"]}
    return best


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    bc = ctx.cfg.benchmark
    sp = ctx.splits()
    x_test = np.ascontiguousarray(sp.tensors["test"][0].numpy())
    y_test = sp.tensors["test"][1].numpy()
    models = {"base": ctx.model("train_base")[0], "compressed": ctx.model("finetune")[0]}
    check_batch = max(bc.batch_sizes)
    ref = {w: _logits(TorchRunner(m), x_test, check_batch) for w, m in models.items()}
    with set_threads(bc.threads):
        runners = _runners(ctx, bc.threads)
        checks = _check(runners, x_test, y_test, check_batch, ref)
        rows = []
        for batch in bc.batch_sizes:
            x = np.ascontiguousarray(x_test[:batch])
            fns = {key: (lambda r=r, x=x: r.run(x)) for key, r in runners.items()}
            stats = time_interleaved({"|".join(k): f for k, f in fns.items()}, bc.warmup, bc.repeat)
            for key_s, st in stats.items():
                which, engine, target = key_s.split("|")
                rows.append({"model": which, "engine": engine, "target": target, "batch": batch, **st,
                             "emulated": False})
    for device in _remote_devices(ctx):
        c, r = _remote(ctx, device, x_test, y_test, ref)
        checks += c
        rows += r
    fpga = {}
    fpga_devices = [d for d in (get_device(n, registry_of(ctx.cfg)) for n in ctx.cfg.targets) if d.is_fpga]
    if fpga_devices:  # the FPGA implements the quantized model: that is its reference
        q_ref = _logits(TorchRunner(deployed_model(ctx, models["compressed"])), x_test, check_batch)
    for device in fpga_devices:
        c, fpga[device.name] = _fpga(ctx, device, x_test, y_test, q_ref)
        checks.append(c)
        say(f"FPGA {device.name}: C simulation top-1 agreement with the quantized PyTorch model "
            f"{100 * c['top1_agreement_vs_pytorch']:.2f}% on {c['images']} test images; estimated "
            f"{estimate_line(fpga[device.name])} (analytic, not synthesis)")
    sizes = _sizes(ctx)
    for r in rows:
        r["artifact_bytes"] = sizes.get((r["model"], r["engine"], r["target"]))
    pairs = []
    for c in rows:
        if c["model"] != "compressed":
            continue
        # int8 has no base of its own: it is compared with the base on the same engine in fp32
        base_engine = c["engine"].removesuffix("_int8")
        r = next(x for x in rows if x["model"] == "base" and
                 (x["engine"], x["target"], x["batch"]) == (base_engine, c["target"], c["batch"]))
        pairs.append({
            "engine": c["engine"], "target": c["target"], "batch": c["batch"],
            "base_ms": r["median_ms"], "compressed_ms": c["median_ms"],
            "base_p90_ms": r["p90_ms"], "compressed_p90_ms": c["p90_ms"],
            "speedup": r["median_ms"] / c["median_ms"], "emulated": c.get("emulated"),
        })
    best = _best(rows, bc.batch_sizes)
    eager = {r["batch"]: r["median_ms"] for r in rows
             if (r["model"], r["engine"], r["target"]) == ("base", "pytorch", "host")}
    vs_eager = {t: {b: eager[int(b)] / v["median_ms"] for b, v in per.items() if int(b) in eager}
                for t, per in best.items() if t == "host" or not any(r.get("emulated") for r in rows if r["target"] == t)}
    result = {"threads": bc.threads, "warmup": bc.warmup, "repeat": bc.repeat,
              "rows": rows, "pairs": pairs, "checks": checks, "best": best,
              "best_vs_base_eager": vs_eager, "fpga_estimates": fpga}
    write_json(out / "latency.json", result)
    table = latency_table(result)
    for name, est in fpga.items():
        c = next(c for c in checks if c["target"] == name)
        table += (f"\n\nFPGA {name} (hls4ml C simulation, bit-accurate): top-1 agreement with the quantized PyTorch "
                  f"model {100 * c['top1_agreement_vs_pytorch']:.2f}% on {c['images']} test images, accuracy "
                  f"{c['test_accuracy']:.2f}%.\nEstimated, not synthesised (needs AMD Vitis HLS / Vivado): "
                  f"{estimate_line(est)}.")
    (out / "latency.txt").write_text(table + "\n")
    say(f"latency per target and engine (local engines interleaved in one process, {bc.threads} threads):\n{table}")
    for t, per in best.items():
        b1 = vs_eager.get(t, {}).get("1")
        say(f"fastest engine for the compressed model on {t}: "
            + ", ".join(f"b{b} {v['engine']} {v['median_ms']:.3f} ms" for b, v in per.items())
            + (f"; {b1:.2f}x faster than the base in PyTorch eager at b1" if b1 else ""))
    for r in rows:
        ctx.tracker.metrics({f"{r['model']}.{r['engine']}.{r['target']}.b{r['batch']}.median_ms": r["median_ms"],
                             f"{r['model']}.{r['engine']}.{r['target']}.b{r['batch']}.p90_ms": r["p90_ms"]})
    for c in checks:
        prefix = f"{c['model']}.{c['engine']}.{c['target']}"
        ctx.tracker.metrics({f"{prefix}.test_accuracy": c["test_accuracy"],
                             **({f"{prefix}.max_abs_diff": c["max_abs_diff_vs_pytorch"]}
                                if c["max_abs_diff_vs_pytorch"] is not None else {})})
    ctx.tracker.params({f"best_engine.{t}.b{b}": v["engine"] for t, per in best.items() for b, v in per.items()})
    ctx.tracker.artifact(out / "latency.json")
    ctx.tracker.artifact(out / "latency.txt")
    feed_back(ctx, rows, models)
    worst = max((c["max_abs_diff_vs_pytorch"] or 0.0) for c in checks if not c["engine"].endswith("_int8"))
    return {"pairs": len(pairs), "max_abs_diff": worst,
            "min_top1_agreement": min((c["top1_agreement_vs_pytorch"] or 1.0) for c in checks),
            "best": best}


def latency_table(result: dict[str, Any]) -> str:
    """One line per model, target and engine: median and p90 per batch size, output check, size."""
    rows, checks = result["rows"], result["checks"]
    batches = sorted({r["batch"] for r in rows})
    header = ["model", "target", "engine"]
    for b in batches:
        header += [f"b{b} median ms", f"b{b} p90 ms"]
    header += ["top-1 vs torch", "max |diff|", "test acc %", "artifact kB"]
    lines = []
    keys = sorted({(r["model"], r["target"], r["engine"]) for r in rows}, key=lambda k: (k[1] != "host", k))
    for which, target, engine in keys:
        line = [which, target + (" (emulated)" if any(r.get("emulated") for r in rows if r["target"] == target) else ""),
                engine]
        size = None
        for b in batches:
            r = next((r for r in rows if (r["model"], r["target"], r["engine"], r["batch"]) == (which, target, engine, b)), None)
            line += [f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}"] if r else ["-", "-"]
            size = size or (r or {}).get("artifact_bytes")
        c = next((c for c in checks if (c["model"], c["target"], c["engine"]) == (which, target, engine)), None)
        agree = c and c["top1_agreement_vs_pytorch"]
        diff = c and c["max_abs_diff_vs_pytorch"]
        line += [f"{100 * agree:.2f}%" if agree is not None and c else "-",
                 f"{diff:.1e}" if diff is not None and c else "-",
                 f"{c['test_accuracy']:.2f}" if c else "-",
                 f"{size / 1e3:.1f}" if size else "-"]
        lines.append(line)
    return render_table(header, lines)


def feed_back(ctx: StageContext, rows: list[dict[str, Any]], models: dict[str, Any]) -> None:
    """Write the measured base/compressed latency ratios into the latency cache the search reads."""
    from tasks.search.trial import LatencyCache

    for target in sorted({r["target"] for r in rows}):
        for engine in sorted({r["engine"] for r in rows if r["target"] == target}):
            b1 = {r["model"]: r for r in rows if (r["target"], r["engine"], r["batch"]) == (target, engine, 1)}
            base_engine = engine.removesuffix("_int8")
            base = next((r for r in rows if (r["model"], r["target"], r["engine"], r["batch"])
                         == ("base", target, base_engine, 1)), None)
            if "compressed" not in b1 or base is None:
                continue
            LatencyCache(ctx.paths.root / "cache" / f"latency-{target}.json", target).record(
                models["base"], models["compressed"], engine, base["median_ms"], b1["compressed"]["median_ms"],
                emulated=bool(b1["compressed"].get("emulated")))
