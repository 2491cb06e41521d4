"""Engines side by side: PyTorch eager, TVM (as before, untuned, tuned), ONNX Runtime fp32 and int8.

For the base ResNet-8 (width 16, Fashion-MNIST) and its compressed form (2x fewer MACs by channel
pruning), every engine is timed in one process, interleaved, with the same thread count, at batch 1
and 32, and checked on the test split. Ratios are taken within this one run.

    .venv/bin/python bench/engines.py [--run .shrinkflow/runs/fashion_resnet/<id>] [--budget 120]

Models: the base and the fine-tuned model of a pipeline run (the newest fashion_resnet run by
default); without one, a ResNet-8 trained here for a short while and pruned (latency does not depend
on the weights; int8 agreement and accuracy do, so they are reported for whatever model was used).

ONNX Runtime: `onnxruntime` and `onnxruntime_int8` are exported as the compile stage does (channels
padded to the vector width; int8 QDQ with the first conv in fp32); `onnxruntime_unpadded` is the
fp32 export of the pruned widths as they are.
TVM variants:
  tvm_unpadded  the schedule with default knobs on the pruned widths as they are (11, 22, 45 channels)
  tvm_untuned   channels padded to whole vector registers, default knobs
  tvm_tuned     padded, and knobs tuned per kernel on this CPU (tuning seconds reported)
The emulated aarch64 device, when it is up (`make arm-device`), times the compressed model's TVM
build over RPC; those figures are qemu's, flagged emulated, and are not ARM speed.
JSON: bench/results/engines.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.engines.timing import thread_env  # noqa: E402

THREADS = 2
os.environ.update(thread_env(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS, fashion_splits, say  # noqa: E402


def _models(run: Path | None, splits) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    from tasks.models.checkpoint import load_checkpoint

    if run is None:
        runs = sorted((ROOT / ".shrinkflow" / "runs" / "fashion_resnet").glob("*/finetune/model.pt"))
        run = runs[-1].parents[1] if runs else None
    if run is not None:
        base, _ = load_checkpoint(run / "train_base" / "model.pt")
        comp, _ = load_checkpoint(run / "finetune" / "model.pt")
        return base.eval(), comp.eval(), f"pipeline run {run}"
    from compression_ops import OpData, TrainSpec, fit
    from compression_ops.channel_prune import ChannelPrune, channel_prune
    from tasks.models import create_model

    say("no fashion_resnet run found: training a ResNet-8 for 2 epochs here (a few minutes)")
    torch.manual_seed(0)
    base = create_model("resnet8", in_channels=1, num_classes=10, width=16)
    fit(base, splits.batches("train", 128, train=True, seed=0), TrainSpec(epochs=2, lr=0.1))
    comp = channel_prune(copy.deepcopy(base).eval(), ChannelPrune(target_macs_reduction=2.0),
                         OpData(example=splits.example(4))).model
    fit(comp, splits.batches("train", 128, train=True, seed=1), TrainSpec(epochs=1, lr=0.02))
    return base.eval(), comp.eval(), "trained here: 2 epochs, pruned 2x fewer MACs, 1 epoch fine-tune"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="a pipeline run folder with train_base/ and finetune/")
    ap.add_argument("--budget", type=float, default=120.0, help="TVM tuning seconds per model")
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS / "engines.json")
    args = ap.parse_args()

    from tasks.devices import get_device
    from tasks.engines.onnx_int8 import quantize_onnx_int8
    from tasks.engines.onnx_runtime import export_onnx, load_onnx
    from tasks.engines.pad_channels import pad_channels
    from tasks.engines.pytorch_eager import TorchRunner
    from tasks.engines.timing import time_interleaved
    from tasks.engines.tvm_build import build_tvm, load_tvm
    from tasks.engines.tvm_schedule import device_lanes
    from tasks.workspace import write_json

    splits = fashion_splits()
    base, comp, origin = _models(args.run, splits)
    say(f"models: {origin}")
    x_test = np.ascontiguousarray(splits.tensors["test"][0].numpy())
    y_test = splits.tensors["test"][1].numpy()
    example = splits.example(4)
    target = get_device("host").tvm_target()
    runners, build_s, tuning = {}, {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="shrinkflow-engines-"))
    db = tmp / "tuning.json"  # a fresh database: the tuning time is the real cost
    for which, model in (("base", base), ("compressed", comp)):
        runners[(which, "pytorch")] = TorchRunner(model)
        variants = {"tvm_unpadded": dict(pad_channels=False), "tvm_untuned": dict(pad_channels=True),
                    "tvm_tuned": dict(pad_channels=True, tuning_db=db, tuning_budget_s=args.budget)}
        for name, kw in variants.items():
            t0 = time.perf_counter()
            meta = build_tvm(model, example, target, tmp / which / name, **kw)
            build_s[f"{which}.{name}"] = time.perf_counter() - t0
            if meta.get("tuning"):
                tuning[which] = meta["tuning"]
            runners[(which, name)] = load_tvm(tmp / which / name)
            say(f"{which} {name}: built in {build_s[f'{which}.{name}']:.1f} s")
        # as the compile stage does: ONNX exported with channels padded to the vector width
        padded, _ = pad_channels(model, example, device_lanes(get_device("host")))
        export_onnx(model, example, tmp / which / "unpadded.onnx")
        runners[(which, "onnxruntime_unpadded")] = load_onnx(tmp / which / "unpadded.onnx", THREADS)
        export_onnx(padded, example, tmp / which / "model.onnx")
        runners[(which, "onnxruntime")] = load_onnx(tmp / which / "model.onnx", THREADS)
        calib = splits.tensors["train"][0][:512].numpy()
        int8_meta = quantize_onnx_int8(tmp / which / "model.onnx", tmp / which / "model.int8.onnx", calib,
                                       method="percentile")
        runners[(which, "onnxruntime_int8")] = load_onnx(tmp / which / "model.int8.onnx", THREADS)
        say(f"{which} int8: kernels {int8_meta.get('int8_ops')}, float nodes {int8_meta.get('float_nodes')}")

    checks = {}
    ref = {}
    for (which, engine), r in runners.items():
        lg = np.concatenate([r.run(x_test[i : i + 256]) for i in range(0, len(x_test), 256)])
        if engine == "pytorch":
            ref[which] = lg
        checks[f"{which}.{engine}"] = lg
    check_rows = {k: {"test_accuracy": float(100 * (lg.argmax(1) == y_test).mean()),
                      "top1_agreement_vs_pytorch": float((lg.argmax(1) == ref[k.split(".")[0]].argmax(1)).mean()),
                      "max_abs_diff_vs_pytorch": float(np.abs(lg - ref[k.split(".")[0]]).max())}
                  for k, lg in checks.items()}

    lat: dict[str, dict[str, dict[str, float]]] = {}
    for b in (1, 32):
        x = np.ascontiguousarray(x_test[:b])
        st = time_interleaved({f"{w}.{e}": (lambda r=r, x=x: r.run(x)) for (w, e), r in runners.items()},
                              warmup=20, repeat=args.repeat)
        for k, v in st.items():
            lat.setdefault(k, {})[str(b)] = {"median_ms": v["median_ms"], "p90_ms": v["p90_ms"]}

    arm = _arm(comp, base, example, x_test, ref)
    eager_b1 = lat["base.pytorch"]["1"]["median_ms"]
    ort = {b: lat["compressed.onnxruntime"][b]["median_ms"] for b in ("1", "32")}
    best = {b: min(((k, v[b]["median_ms"]) for k, v in lat.items() if k.startswith("compressed.")), key=lambda kv: kv[1])
            for b in ("1", "32")}
    summary = {
        "compressed_best_engine": {b: {"engine": k, "median_ms": ms} for b, (k, ms) in best.items()},
        "compressed_best_vs_base_eager_b1": eager_b1 / best["1"][1],
        "tvm_tuned_vs_ort_fp32": {b: ort[b] / lat["compressed.tvm_tuned"][b]["median_ms"] for b in ("1", "32")},
        "tvm_tuned_vs_unpadded": {b: lat["compressed.tvm_unpadded"][b]["median_ms"]
                                  / lat["compressed.tvm_tuned"][b]["median_ms"] for b in ("1", "32")},
        "int8_vs_fp32_ort": {w: {b: lat[f"{w}.onnxruntime"][b]["median_ms"] / lat[f"{w}.onnxruntime_int8"][b]["median_ms"]
                                 for b in ("1", "32")} for w in ("base", "compressed")},
    }
    result = {"models": origin, "threads": THREADS, "cpu": target.get("mcpu"), "latency": lat,
              "checks": check_rows, "build_seconds": build_s, "tuning": tuning, "arm_emulated": arm,
              "summary": summary}
    write_json(args.out, result)

    print(f"\n{'model.engine':30s} {'b1 ms':>8s} {'b1 p90':>8s} {'b32 ms':>8s} {'b32 p90':>8s} "
          f"{'b1 vs base eager':>17s} {'top-1 vs torch':>15s} {'test %':>7s}")
    for k, v in lat.items():
        c = check_rows[k]
        print(f"{k:30s} {v['1']['median_ms']:8.3f} {v['1']['p90_ms']:8.3f} {v['32']['median_ms']:8.3f} "
              f"{v['32']['p90_ms']:8.3f} {eager_b1 / v['1']['median_ms']:16.2f}x "
              f"{100 * c['top1_agreement_vs_pytorch']:14.2f}% {c['test_accuracy']:7.2f}")
    for which, t in tuning.items():
        print(f"tuning {which}: {t['tuned']} kernels tuned in {t['seconds']} s, {t['from_db']} from the database")
    s = summary
    print(f"\ncompressed, best engine: b1 {s['compressed_best_engine']['1']}, b32 {s['compressed_best_engine']['32']}")
    print(f"compressed best engine vs base in PyTorch eager at b1: {s['compressed_best_vs_base_eager_b1']:.2f}x")
    print(f"TVM tuned vs ONNX Runtime fp32 (compressed; >1: TVM faster): "
          f"b1 {s['tvm_tuned_vs_ort_fp32']['1']:.2f}x, b32 {s['tvm_tuned_vs_ort_fp32']['32']:.2f}x")
    print(f"TVM tuned+padded vs the schedule on unpadded widths (compressed): "
          f"b1 {s['tvm_tuned_vs_unpadded']['1']:.2f}x, b32 {s['tvm_tuned_vs_unpadded']['32']:.2f}x")
    for w, r in s["int8_vs_fp32_ort"].items():
        print(f"ORT int8 vs fp32 ({w}; >1: int8 faster): b1 {r['1']:.2f}x, b32 {r['32']:.2f}x")
    if arm:
        print(f"aarch64 (EMULATED by qemu, not ARM speed): {arm}")
    say(f"wrote {args.out}")


def _arm(comp, base, example, x_test, ref) -> dict | None:
    """Compressed and base on the emulated aarch64 device, if it is up: outputs checked, timed there."""
    from tasks.devices import get_device
    from tasks.engines.tvm_build import build_tvm
    from tasks.engines.tvm_rpc import RemoteTVMRunner
    from tasks.errors import DeviceError

    device = get_device("aarch64_neon")
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which, model in (("base", base), ("compressed", comp)):
            build_tvm(model, example, device.tvm_target(), Path(tmp) / which, cross_compiler=device.cross_compiler)
            try:
                with RemoteTVMRunner.for_device(Path(tmp) / which, device, retries=0) as r:
                    lg = np.concatenate([r.run(x_test[i : i + 32]) for i in range(0, 320, 32)])
                    out[which] = {
                        "top1_agreement_vs_pytorch": float((lg.argmax(1) == ref[which][:320].argmax(1)).mean()),
                        "max_abs_diff_vs_pytorch": float(np.abs(lg - ref[which][:320]).max()),
                        **{f"b{b}": r.time(np.ascontiguousarray(x_test[:b]), number=5, repeat=5) for b in (1, 32)},
                    }
            except DeviceError as e:
                say(f"aarch64 device not measured: {str(e)[:200]}")
                return None
    return out


if __name__ == "__main__":
    main()
