"""Every model family through the whole chain: train, compress, fine-tune, compile, benchmark.

Each family of tasks/models/families.py (its `bench_arch`, a wider version of the test config) is
trained briefly on Fashion-MNIST with the same budget for all (same subset, epochs and recipe: AdamW,
one-cycle, lr 2e-3; fine-tuning AdamW, cosine, lr 5e-4, distilled from the base), then
`shrinkflow run` compresses it for the goal "2x, at most 1 point of accuracy lost" with the plan
[channel_prune, quantize_int8], no search, and compiles and benchmarks it on this machine. The 2x is
solved in MACs (goal.metric: macs), and the speed-up is then measured: on models this small, PyTorch
eager at batch 1 is dominated by per-op overhead (a ViT pruned at ratio 0.95 ran only 1.89x faster
in eager), so a 2x eager-latency goal is out of reach by pruning and the pipeline would refuse it up
front; the compiled engines are where the MACs turn into time. Printed per family:

  accuracy drop, MACs ratio, the fraction of MACs the plan covered (finetune/coverage.json: every op of the plan),
  the fastest engine for the compressed model at b1 / b32 and its speed-up against the base model in
  PyTorch eager (benchmark/latency.json, every engine timed interleaved in one process),
  TVM against ONNX Runtime (fp32) on the compressed model at b1 / b32, or why TVM was skipped.

    .venv/bin/python bench/families.py [--families vit,convnext] [--train-subset 6000] [--epochs 3]
                                       [--tvm-tuning-s 30]

Each run is a real `shrinkflow run --no-airflow` in a subprocess (its log lands beside the run); a
family that fails prints its error and the table goes on. JSON: bench/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, say  # noqa: E402
from tasks.models.families import FAMILIES  # noqa: E402

WORKSPACE = ROOT / ".shrinkflow" / "bench" / "families"


def pipeline(name: str, arch: dict[str, Any], subset: int, epochs: int, tuning_s: float) -> dict[str, Any]:
    """The same recipe for every family: only the model differs."""
    model = {k: v for k, v in arch.items() if k != "kwargs"}
    model["kwargs"] = arch.get("kwargs", {})
    return {
        "description": f"bench/families.py: {name}",
        "data": {"source": "fashion_mnist", "val_fraction": 0.1, "train_subset": subset},
        "model": model,
        # AdamW for every family: SGD at one learning rate left the transformers near chance (DeiT 10 %,
        # Swin 24 %, ViT 35 % after 2 epochs at lr 0.05) while the convnets reached 55-81 %.
        "train": {"epochs": epochs, "batch_size": 128, "lr": 2e-3, "optimizer": "adamw", "weight_decay": 0.05,
                  "label_smoothing": 0.05},
        "goal": {"speedup": 2.0, "metric": "macs", "max_accuracy_drop": 1.0},
        "compression": {"plan": [{"op": "channel_prune"}, {"op": "quantize_int8", "calibration": "percentile"}]},
        "search": {"n_trials": 0},
        "finetune": {"epochs": epochs, "batch_size": 128, "lr": 5e-4, "weight_decay": 0.05},
        "targets": ["host"],
        "compile": {"tuning": {"budget_s": tuning_s}},
        "benchmark": {"batch_sizes": [1, 32], "warmup": 5, "repeat": 20, "threads": 2},
    }


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _engine_ms(lat: dict[str, Any], engine: str, batch: int) -> float | None:
    for r in lat.get("rows", []):
        if r["model"] == "compressed" and r["engine"] == engine and r["target"] == "host" and r["batch"] == batch:
            return r["median_ms"]
    return None


def summarise(run: Path) -> dict[str, Any]:
    """The figures of one finished run, read from its artifacts."""
    base, comp = _json(run / "train_base/metrics.json"), _json(run / "finetune/metrics.json")
    cov = _json(run / "finetune/coverage.json") or {}  # the whole plan's: pruning and int8
    lat = _json(run / "benchmark/latency.json") or {}
    compiled = _json(run / "compile/compile.json") or {}
    best = lat.get("best", {}).get("host", {})
    vs = lat.get("best_vs_base_eager", {}).get("host", {})
    tvm_skip = next((a.get("skipped") for a in compiled.get("artifacts", [])
                     if a["engine"] == "tvm" and a["model"] == "compressed" and a.get("skipped")), None)
    out: dict[str, Any] = {
        "base_accuracy": base and base["test_accuracy"],
        "accuracy_drop": comp and comp["accuracy_drop"],
        "macs_ratio": comp and comp["macs_reduction"],
        "goal_met": comp and comp["goal_met"],
        "macs_covered": cov.get("macs_covered_fraction"),
        "tvm_skipped": tvm_skip,
    }
    for b in (1, 32):
        out[f"best_b{b}"] = best.get(str(b), {}).get("engine")
        out[f"speedup_b{b}"] = vs.get(str(b))
        tvm, ort = _engine_ms(lat, "tvm", b), _engine_ms(lat, "onnxruntime", b)
        out[f"tvm_vs_ort_b{b}"] = ort / tvm if tvm and ort else None
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = ("family", "base acc", "drop pt", "MACs x", "covered", "best b1", "x b1", "best b32", "x b32",
            "ORT/TVM b1", "ORT/TVM b32", "minutes")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for fam, r in rows.items():
        if "error" in r:
            lines.append(f"{fam} | failed: {r['error']}")
            continue
        lines.append(" | ".join([
            fam, _fmt(r["base_accuracy"]), _fmt(r["accuracy_drop"]), _fmt(r["macs_ratio"]),
            _fmt(r["macs_covered"], ".0%") if r["macs_covered"] is not None else "-",
            _fmt(r["best_b1"]), _fmt(r["speedup_b1"]), _fmt(r["best_b32"]), _fmt(r["speedup_b32"]),
            "TVM skipped" if r["tvm_skipped"] else _fmt(r["tvm_vs_ort_b1"]),
            "" if r["tvm_skipped"] else _fmt(r["tvm_vs_ort_b32"]), _fmt(r["minutes"], ".1f"),
        ]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all)")
    ap.add_argument("--train-subset", type=int, default=6000, help="training images (same for every family)")
    ap.add_argument("--epochs", type=int, default=3, help="training and fine-tuning epochs (same for every family)")
    ap.add_argument("--tvm-tuning-s", type=float, default=30.0, help="TVM tuning budget per model (0: default knobs)")
    ap.add_argument("--run-id", default="bench")
    args = ap.parse_args()
    names = [n for n in args.families.split(",") if n]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    WORKSPACE.mkdir(parents=True, exist_ok=True)
    config = WORKSPACE / "pipelines.yaml"
    doc = {"pipelines": {f"fam_{n}": pipeline(n, FAMILIES[n].bench_arch or FAMILIES[n].arch, args.train_subset,
                                                args.epochs, args.tvm_tuning_s) for n in names}}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    rows: dict[str, dict[str, Any]] = {}
    for n in names:
        say(f"{n}: shrinkflow run fam_{n}")
        log = WORKSPACE / f"{n}.log"
        t0 = time.perf_counter()
        with log.open("w") as f:
            proc = subprocess.run(
                [str(ROOT / ".venv/bin/shrinkflow"), "--config", str(config), "--workspace", str(WORKSPACE),
                 "run", f"fam_{n}", "--run-id", args.run_id, "--no-airflow"],
                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False,
            )
        minutes = (time.perf_counter() - t0) / 60
        if proc.returncode != 0:
            tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-3:]
            rows[n] = {"error": " / ".join(tail)[-300:], "minutes": minutes}
            say(f"{n}: FAILED after {minutes:.1f} min (log {log})")
            continue
        rows[n] = {**summarise(WORKSPACE / "runs" / f"fam_{n}" / args.run_id), "minutes": minutes}
        say(f"{n}: done in {minutes:.1f} min: {rows[n]}")
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "families.json").write_text(json.dumps(
        {"train_subset": args.train_subset, "epochs": args.epochs, "families": rows}, indent=1))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
