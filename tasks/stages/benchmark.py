"""Stage 6: base vs compressed on every engine, side by side in one process, same thread count.

Each compiled artifact is first checked against PyTorch (max |diff| of logits, top-1 agreement and
accuracy on the test split), then all engines are timed interleaved at each batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.devices import get_device
from tasks.engines.onnx_runtime import load_onnx
from tasks.engines.pytorch_eager import TorchRunner
from tasks.engines.timing import set_threads, time_interleaved
from tasks.engines.tvm_build import load_tvm
from tasks.progress import say
from tasks.report import render_table
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
                if get_device(name).rpc is None:  # remote devices are measured over RPC (issue 5)
                    out[(which, "tvm", name)] = load_tvm(compiled / which / name)
    return out


def _check(runners: dict, x_test: np.ndarray, y_test: np.ndarray, batch: int) -> list[dict[str, Any]]:
    """Accuracy of every runner on the test split, and agreement with PyTorch on the same model."""
    rows = []
    logits: dict[tuple[str, str, str], np.ndarray] = {}
    for key, r in runners.items():
        parts = [r.run(x_test[i : i + batch]) for i in range(0, len(x_test) - batch + 1, batch)]
        logits[key] = np.concatenate(parts)
    n = len(next(iter(logits.values())))
    for (which, engine, target), lg in logits.items():
        # int8 is compared with float PyTorch: the agreement shows what quantization changed
        ref = logits.get((which, "pytorch", "host"))
        rows.append({
            "model": which,
            "engine": engine,
            "target": target,
            "test_accuracy": float(100.0 * (lg.argmax(1) == y_test[:n]).mean()),
            "max_abs_diff_vs_pytorch": float(np.abs(lg - ref).max()) if ref is not None else None,
            "top1_agreement_vs_pytorch": float((lg.argmax(1) == ref.argmax(1)).mean()) if ref is not None else None,
        })
    return rows


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    bc = ctx.cfg.benchmark
    sp = ctx.splits()
    x_test = sp.tensors["test"][0].numpy()
    y_test = sp.tensors["test"][1].numpy()
    with set_threads(bc.threads):
        runners = _runners(ctx, bc.threads)
        check_batch = max(bc.batch_sizes)
        checks = _check(runners, x_test, y_test, check_batch)
        rows = []
        for batch in bc.batch_sizes:
            x = np.ascontiguousarray(x_test[:batch])
            fns = {key: (lambda r=r, x=x: r.run(x)) for key, r in runners.items()}
            stats = time_interleaved({"|".join(k): f for k, f in fns.items()}, bc.warmup, bc.repeat)
            for key_s, st in stats.items():
                which, engine, target = key_s.split("|")
                rows.append({"model": which, "engine": engine, "target": target, "batch": batch, **st})
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
            "speedup": r["median_ms"] / c["median_ms"],
        })
    result = {"threads": bc.threads, "warmup": bc.warmup, "repeat": bc.repeat,
              "rows": rows, "pairs": pairs, "checks": checks}
    write_json(out / "latency.json", result)
    table = render_table(
        ["model", "engine", "target", "batch", "median ms", "p90 ms"],
        [[r["model"], r["engine"], r["target"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}"]
         for r in rows],
    )
    (out / "latency.txt").write_text(table + "\n")
    say(f"latency (same process, interleaved, {bc.threads} threads):\n{table}")
    for r in rows:
        ctx.tracker.metrics({f"{r['model']}.{r['engine']}.{r['target']}.b{r['batch']}.median_ms": r["median_ms"],
                             f"{r['model']}.{r['engine']}.{r['target']}.b{r['batch']}.p90_ms": r["p90_ms"]})
    for c in checks:
        prefix = f"{c['model']}.{c['engine']}.{c['target']}"
        ctx.tracker.metrics({f"{prefix}.test_accuracy": c["test_accuracy"],
                             **({f"{prefix}.max_abs_diff": c["max_abs_diff_vs_pytorch"]}
                                if c["max_abs_diff_vs_pytorch"] is not None else {})})
    ctx.tracker.artifact(out / "latency.json")
    worst = max((c["max_abs_diff_vs_pytorch"] or 0.0) for c in checks)
    return {"pairs": len(pairs), "max_abs_diff": worst,
            "min_top1_agreement": min((c["top1_agreement_vs_pytorch"] or 1.0) for c in checks)}
