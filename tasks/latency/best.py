"""From the measured rows: base/compressed pairs, the fastest engine per target, and the table."""

from __future__ import annotations

from typing import Any

from tasks.engines import ENGINES
from tasks.latency.rows import Check, Latency, Pair, Skipped
from tasks.report import render_table


def base_engine(engine: str) -> str:
    """The engine whose base row a compressed row on `engine` is compared with (int8: fp32 ONNX Runtime)."""
    e = ENGINES.get(engine)
    return (e.base_engine if e else None) or engine


def pairs(rows: list[Latency]) -> list[Pair]:
    """Each compressed row with the base on the same engine (or the engine its registry entry names)."""
    by_key = {r.key: r for r in rows}
    out = []
    for c in rows:
        if c.model != "compressed":
            continue
        b = by_key.get(("base", base_engine(c.engine), c.target, c.batch))
        if b is None:
            continue
        out.append(Pair(c.engine, c.target, c.batch, b.median_ms, c.median_ms, b.p90_ms, c.p90_ms,
                        b.median_ms / c.median_ms, c.emulated))
    return out


def best_engines(rows: list[Latency], batch_sizes: list[int]) -> dict[str, dict[str, dict[str, Any]]]:
    """The fastest engine for the compressed model per target and batch size."""
    best: dict[str, dict[str, Any]] = {}
    for target in sorted({r.target for r in rows}):
        best[target] = {}
        for b in batch_sizes:
            mine = [r for r in rows if r.model == "compressed" and r.target == target and r.batch == b]
            if mine:
                r = min(mine, key=lambda r: r.median_ms)
                best[target][str(b)] = {"engine": r.engine, "median_ms": r.median_ms}
    return best


def vs_base_eager(rows: list[Latency], best: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """How much faster the best engine runs the compressed model than PyTorch eager runs the base, per
    target measured on real hardware (an emulated device's times are not comparable with the host's)."""
    eager = {r.batch: r.median_ms for r in rows if (r.model, r.engine, r.target) == ("base", "pytorch", "host")}
    emulated = {r.target for r in rows if r.emulated}
    return {t: {b: eager[int(b)] / v["median_ms"] for b, v in per.items() if int(b) in eager}
            for t, per in best.items() if t == "host" or t not in emulated}


def latency_table(rows: list[Latency], checks: list[Check]) -> str:
    """One line per model, target and engine: median and p90 per batch size, output check, size."""
    batches = sorted({r.batch for r in rows})
    header = ["model", "target", "engine"]
    for b in batches:
        header += [f"b{b} median ms", f"b{b} p90 ms"]
    header += ["top-1 vs torch", "max |diff|", "test acc %", "artifact kB"]
    by_key = {r.key: r for r in rows}
    check_of = {c.key: c for c in checks}
    emulated = {r.target for r in rows if r.emulated}
    lines = []
    for which, target, engine in sorted({(r.model, r.target, r.engine) for r in rows}, key=lambda k: (k[1] != "host", k)):
        line = [which, target + (" (emulated)" if target in emulated else ""), engine]
        size = None
        for b in batches:
            r = by_key.get((which, engine, target, b))
            line += [f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}"] if r else ["-", "-"]
            size = size or (r.artifact_bytes if r else None)
        c = check_of.get((which, engine, target))
        agree = c.top1_agreement_vs_pytorch if c else None
        diff = c.max_abs_diff_vs_pytorch if c else None
        line += [f"{100 * agree:.2f}%" if agree is not None else "-",
                 f"{diff:.1e}" if diff is not None else "-",
                 f"{c.test_accuracy:.2f}" if c else "-",
                 f"{size / 1e3:.1f}" if size else "-"]
        lines.append(line)
    return render_table(header, lines)


def skipped_lines(skipped: list[Skipped], checks: list[Check]) -> str:
    """The builds compile skipped, as "tvm: skipped — <reason>" lines (one per engine, target and reason),
    and, for a target where that leaves a model with no engine at all, a line that says nothing was measured."""
    if not skipped:
        return ""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for s in skipped:
        grouped.setdefault((s.target, s.engine, s.reason), []).append(s.model)
    lines = ["Skipped builds (the engine cannot express the model; not checked, not timed):"]
    for (target, engine, reason), models in sorted(grouped.items(), key=lambda kv: (kv[0][0] != "host", kv[0])):
        lines.append(f"  {engine}: skipped — {reason} [{' and '.join(sorted(models))} on {target}]")
    measured = {(c.target, c.model) for c in checks}
    for target, model in sorted({(s.target, s.model) for s in skipped}):
        if (target, model) not in measured:
            engines = sorted({s.engine for s in skipped if (s.target, s.model) == (target, model)})
            lines.append(f"  NOTHING MEASURED for the {model} model on target {target!r}: {', '.join(engines)}, "
                         "its only engine, was skipped. Serve the target with another engine (benchmark.engines), "
                         "change the model, or drop the target")
    return "\n".join(lines)
