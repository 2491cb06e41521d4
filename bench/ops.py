"""One row per compression op and setting on Fashion-MNIST, every figure a ratio to the base measured
in the same run.

    python bench/ops.py                       # both models, every row (about an hour on 2 cores)
    python bench/ops.py --models resnet8 --rows prune5_kd,prune5_plain --epochs 3

Each row applies its plan to the converged base (bench/common.py), fine-tunes for the same number of
epochs (distilling from the base unless the row says plain; post-training quantization rows have no
fine-tune), then measures: test accuracy, params, MACs, bytes (state_dict, and the compact form a
device downloads: packed sparse/codebook weights or the int8 ONNX file), and latency at batch 1 and
32 in PyTorch eager and in the best engine for the op (ONNX Runtime fp32, or int8 for quantized
rows), each timed interleaved with the base on the same engine. JSON goes to bench/results/ops.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# isort: off
from common import RESULTS, base_model, fashion_splits, say  # first: sets the thread env before torch loads
# isort: on
import numpy as np
import torch

from compression_ops import (
    ChannelPrune,
    Distill,
    KMeansQuant,
    LowRank,
    OpData,
    QuantAware,
    QuantizeInt8,
    Sparsify,
    TrainSpec,
    apply,
    evaluate,
    fit,
)
from compression_ops.base import to_plain
from compression_ops.metrics import model_stats, serialized_bytes
from compression_ops.packing import pack_state_dict, packed_size
from compression_ops.quantize import quantized_state_dict
from tasks.engines.onnx_int8 import quantize_onnx_int8
from tasks.engines.onnx_runtime import export_onnx, load_onnx
from tasks.engines.pytorch_eager import TorchRunner
from tasks.engines.timing import set_threads, time_interleaved

# name -> (plan, fine-tune: "kd" | "plain" | None). Ratios are solved per model for the MACs targets.
ROWS: dict[str, tuple[list, str | None]] = {
    "base_ft_kd": ([], "kd"),  # control: the base fine-tuned as long as every other row
    "prune2_kd": ([ChannelPrune(target_macs_reduction=2.0)], "kd"),
    "prune5_kd": ([ChannelPrune(target_macs_reduction=5.0)], "kd"),
    "prune5_plain": ([ChannelPrune(target_macs_reduction=5.0)], "plain"),
    "prune5_dcp_kd": ([ChannelPrune(target_macs_reduction=5.0, importance="dcp")], "kd"),
    "sparse50_kd": ([Sparsify(sparsity=0.5, schedule="gradual")], "kd"),
    "sparse2of4_kd": ([Sparsify(sparsity=0.5, pattern="2:4")], "kd"),
    "int8_minmax": ([QuantizeInt8(calibration="minmax")], None),
    "int8_percentile": ([QuantizeInt8(calibration="percentile")], None),
    "int8_mse": ([QuantizeInt8(calibration="mse")], None),
    "qat4_kd": ([QuantAware(bits=4)], "kd"),
    "kmeans4_kd": ([KMeansQuant(bits=4)], "kd"),
    "lowrank90_kd": ([LowRank(energy=0.9)], "kd"),
    "prune2_int8_kd": ([ChannelPrune(target_macs_reduction=2.0), QuantizeInt8(calibration="percentile")], "kd"),
}


def run_row(name: str, base: torch.nn.Module, sp, epochs: int, threads: int) -> dict[str, Any]:
    plan, ft = ROWS[name]
    t0 = time.perf_counter()
    example = sp.example(1)
    data = OpData(example=example, batches=sp.batches("train", 64, train=True, seed=1), max_batches=16)
    model, hooks, reports = copy.deepcopy(base), [], []
    pre = [op for op in plan if op.phase in ("structure", "train")]
    post = [op for op in plan if op.phase == "post"]
    for op in pre:
        res = apply(model, op, data)
        model, hooks, reports = res.model, hooks + res.hooks, reports + [res.report]
    if ft:
        fit(model, sp.batches("train", 128, train=True, augment=True, seed=2), TrainSpec(epochs=epochs, lr=0.02),
            teacher=base if ft == "kd" else None, distill=Distill(temperature=4.0, alpha=0.7) if ft == "kd" else None,
            hooks=hooks)
        reports += [h.finish() for h in hooks]
    # What is exported: plain layers (QAT's fake-quant layers baked to their weight grid); the int8
    # file is made from it by quantizing the exported graph. `model` stays what PyTorch simulates.
    fp32 = to_plain(copy.deepcopy(model)).eval()
    for op in post:
        res = apply(fp32, op, data)
        model, reports = res.model, reports + [res.report]
    row = {"row": name, "plan": [op.to_dict() for op in plan], "finetune": ft, "epochs": epochs if ft else 0}
    row["test_accuracy_pytorch"] = evaluate(model, sp.batches("test"))["accuracy"]
    row.update(model_stats(fp32, example))
    row["state_dict_bytes"] = serialized_bytes(fp32)
    row["packed_bytes"] = len(pack_state_dict(quantized_state_dict(model)))  # int codes when quantized
    row["reports"] = reports
    row.update(measure_engines(name, base, fp32, post, sp, threads))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def measure_engines(name: str, base, model, post: list, sp, threads: int) -> dict[str, Any]:
    """ONNX (fp32, and int8 when the plan quantizes), accuracy on test, latency vs the base interleaved."""
    x_test, y_test = sp.tensors["test"][0].numpy(), sp.tensors["test"][1].numpy()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        export_onnx(base, sp.example(1), d / "base.onnx")
        export_onnx(model, sp.example(1), d / "row.onnx")
        runners = {"base_pytorch": TorchRunner(base), "row_pytorch": TorchRunner(model),
                   "base_ort": load_onnx(d / "base.onnx", threads), "row_ort": load_onnx(d / "row.onnx", threads)}
        out["onnx_fp32_bytes"] = (d / "row.onnx").stat().st_size
        out["base_onnx_fp32_bytes"] = (d / "base.onnx").stat().st_size
        best = "row_ort"
        if post:
            q = post[-1]
            calib = sp.tensors["train"][0][:512].numpy()
            meta = quantize_onnx_int8(d / "row.onnx", d / "row.int8.onnx", calib, method=q.calibration)
            runners["row_ort_int8"] = load_onnx(d / "row.int8.onnx", threads)
            out["onnx_int8_bytes"] = (d / "row.int8.onnx").stat().st_size
            out["int8_kernels"] = meta.get("int8_ops")
            best = "row_ort_int8"
        for key, r in runners.items():
            if key.startswith("row"):
                logits = np.concatenate([r.run(x_test[i : i + 500]) for i in range(0, len(x_test), 500)])
                out[f"test_accuracy_{key[4:]}"] = float(100.0 * (logits.argmax(1) == y_test).mean())
        with set_threads(threads):
            for b in (1, 32):
                x = np.ascontiguousarray(x_test[:b])
                pairs = {"pytorch": ("base_pytorch", "row_pytorch"), "best": ("base_ort", best)}
                fns = {k: (lambda r=runners[k], x=x: r.run(x)) for pair in pairs.values() for k in pair}
                st = time_interleaved(fns, warmup=20, repeat=100)
                for label, (bk, rk) in pairs.items():
                    out[f"b{b}_{label}_base_ms"] = st[bk]["median_ms"]
                    out[f"b{b}_{label}_ms"] = st[rk]["median_ms"]
                    out[f"b{b}_{label}_speedup"] = st[bk]["median_ms"] / st[rk]["median_ms"]
        out["best_engine"] = "onnxruntime int8" if post else "onnxruntime fp32"
    return out


def table(rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    head = (f"{'row':18} {'acc %':>6} {'drop':>6} {'params':>7} {'MACs':>6} {'packed':>6} {'onnx':>6} "
            f"{'eager b1':>8} {'eager b32':>9} {'best b1':>7} {'best b32':>8}  engine")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = r.get("test_accuracy_ort_int8", r["test_accuracy_pytorch"])
        onnx = base["onnx_fp32_bytes"] / r.get("onnx_int8_bytes", r["onnx_fp32_bytes"])
        packed = base["packed_bytes"] / r["packed_bytes"]
        lines.append(
            f"{r['row']:18} {acc:6.2f} {base['test_accuracy'] - acc:+6.2f} {base['params'] / r['params']:6.2f}x "
            f"{base['macs'] / r['macs']:5.2f}x {packed:5.2f}x {onnx:5.2f}x {r['b1_pytorch_speedup']:7.2f}x {r['b32_pytorch_speedup']:8.2f}x "
            f"{r['b1_best_speedup']:6.2f}x {r['b32_best_speedup']:7.2f}x  {r['best_engine']}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet8,mobilenet_tiny")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs, the same for every row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "ops.json"))
    args = ap.parse_args()
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    sp = fashion_splits()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for key in args.models.split(","):
        base, meta = base_model(key, sp)
        bstats = {**model_stats(base, sp.example(1)), "state_dict_bytes": serialized_bytes(base),
                  "packed_bytes": packed_size(base),
                  "test_accuracy": evaluate(base, sp.batches("test"))["accuracy"], "base_training": meta}
        entry = results.setdefault(key, {"base": bstats, "rows": {}})
        entry["base"] = bstats
        for name in args.rows.split(","):
            say(f"{key}: {name} ...")
            row = run_row(name, base, sp, args.epochs, args.threads)
            bstats.setdefault("onnx_fp32_bytes", row["base_onnx_fp32_bytes"])
            entry["rows"][name] = row
            say(f"{key}: {name}: test {row.get('test_accuracy_ort_int8', row['test_accuracy_pytorch']):.2f}% "
                f"({row['seconds']} s)")
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            os.replace(tmp, out_path)
        print(f"\n{key}: base {bstats['test_accuracy']:.2f}% test, {bstats['macs'] / 1e6:.2f} M MACs, "
              f"{bstats['params'] / 1e3:.1f} k params; ratios are base / row (higher is better)")
        print(table([entry["rows"][n] for n in args.rows.split(",")], bstats))


if __name__ == "__main__":
    main()
