"""Stage 6: base vs compressed on every engine and target device, side by side.

Every artifact the compile stage built is checked against PyTorch on the test split and then timed, or
estimated, as its engine declares (tasks/latency/measure.py). The result is a table per target and engine
(median and p90 at every batch size, the output check, the artifact's size), the fastest engine per
target for the compressed model (`best`, tasks/latency/best.py), and the device-measured latency ratios,
written back to the latency cache the search reads (tasks/latency/feedback.py: hardware in the loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.context import StageContext
from tasks.engines import get_engine
from tasks.engines.timing import set_threads
from tasks.latency.best import best_engines, latency_table, pairs, skipped_lines, vs_base_eager
from tasks.latency.feedback import feed_back
from tasks.latency.measure import Measured, artifacts, measure, test_split
from tasks.latency.rows import to_json
from tasks.progress import say
from tasks.tracking import StageRun
from tasks.workspace import write_json


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    bc = ctx.cfg.benchmark
    data = test_split(ctx, max(bc.batch_sizes))
    built, skipped = artifacts(ctx)
    with set_threads(bc.threads):
        m = measure(built, data, bc, skipped)
    best = best_engines(m.rows, bc.batch_sizes)
    result = {"threads": bc.threads, "warmup": bc.warmup, "repeat": bc.repeat, "rows": to_json(m.rows),
              "pairs": to_json(pairs(m.rows)), "checks": to_json(m.checks), "best": best,
              "best_vs_base_eager": vs_base_eager(m.rows, best), "estimates": m.estimates,
              "skipped": to_json(m.skipped)}
    write_json(out / "latency.json", result)
    (out / "latency.txt").write_text(_text(m) + "\n")
    say(f"latency per target and engine (local engines interleaved in one process, {bc.threads} threads):\n{_text(m)}")
    for t, per in best.items():
        b1 = result["best_vs_base_eager"].get(t, {}).get("1")
        say(f"fastest engine for the compressed model on {t}: "
            + ", ".join(f"b{b} {v['engine']} {v['median_ms']:.3f} ms" for b, v in per.items())
            + (f"; {b1:.2f}x faster than the base in PyTorch eager at b1" if b1 else ""))
    _log(ctx.tracker, m, best, out)
    feed_back(ctx.paths.root / "cache", m.rows, data.models)
    # int8 is compared with float PyTorch (what quantization changed), not with the model it runs
    exact = [c for c in m.checks if get_engine(c.engine).dtype != "int8"]
    return {"pairs": len(result["pairs"]), "max_abs_diff": max(((c.max_abs_diff_vs_pytorch or 0.0) for c in exact), default=0.0),
            "min_top1_agreement": min(((c.top1_agreement_vs_pytorch or 1.0) for c in m.checks), default=1.0), "best": best,
            "skipped": [f"{s.engine} {s.model} on {s.target}" for s in m.skipped]}


def _text(m: Measured) -> str:
    """The latency table, and what an estimate-only engine (FPGA) measured instead."""
    text = latency_table(m.rows, m.checks)
    if m.skipped:
        text += "\n\n" + skipped_lines(m.skipped, m.checks)
    for target, est in m.estimates.items():
        c = next(c for c in m.checks if c.target == target)
        line = get_engine(c.engine).adapter.estimate_line(est)
        text += (f"\n\nFPGA {target} (hls4ml C simulation, bit-accurate): top-1 agreement with the quantized PyTorch "
                 f"model {100 * c.top1_agreement_vs_pytorch:.2f}% on {c.images} test images, accuracy "
                 f"{c.test_accuracy:.2f}%.\nEstimated, not synthesised (needs AMD Vitis HLS / Vivado): {line}.")
    return text


def _log(tracker: StageRun, m: Measured, best: dict[str, Any], out: Path) -> None:
    for r in m.rows:
        prefix = f"{r.model}.{r.engine}.{r.target}.b{r.batch}"
        tracker.metrics({f"{prefix}.median_ms": r.median_ms, f"{prefix}.p90_ms": r.p90_ms})
    for c in m.checks:
        prefix = f"{c.model}.{c.engine}.{c.target}"
        tracker.metrics({f"{prefix}.test_accuracy": c.test_accuracy,
                         **({f"{prefix}.max_abs_diff": c.max_abs_diff_vs_pytorch}
                            if c.max_abs_diff_vs_pytorch is not None else {})})
    tracker.params({f"best_engine.{t}.b{b}": v["engine"] for t, per in best.items() for b, v in per.items()})
    if m.skipped:
        tracker.tags({f"skipped.{s.model}.{s.engine}.{s.target}": s.reason[:5000] for s in m.skipped})
    tracker.artifact(out / "latency.json")
    tracker.artifact(out / "latency.txt")
