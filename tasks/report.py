"""The run summary: base vs compressed, as a table for the terminal, a Markdown report and MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.tracking import tracking_uri
from tasks.workspace import RunPaths, read_json


def _fmt_int(v: float) -> str:
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k" if v >= 1e3 else f"{v:.0f}"


def summary_rows(paths: RunPaths) -> tuple[list[str], list[list[str]]]:
    """Header and rows (metric, base, compressed, ratio) from the stages' outputs."""
    base = read_json(paths.require("train_base", "metrics.json"))
    comp = read_json(paths.require("finetune", "metrics.json"))
    rows: list[list[str]] = [
        ["top-1 accuracy (test, %)", f"{base['test_accuracy']:.2f}", f"{comp['test_accuracy']:.2f}",
         f"{comp['test_accuracy'] - base['test_accuracy']:+.2f} pt"],
    ]
    for key, label in (("params", "parameters"), ("macs", "MACs / image"), ("bytes", "state_dict bytes")):
        rows.append([label, _fmt_int(base[key]), _fmt_int(comp[key]), f"{base[key] / max(comp[key], 1):.2f}x smaller"])
    if "packed_bytes" in comp:  # sparse bitmaps, codebooks, int codes: what the weights take at rest
        rows.append(["weights file bytes (torch.save -> packed)", _fmt_int(base["bytes"]), _fmt_int(comp["packed_bytes"]),
                     f"{base['bytes'] / max(comp['packed_bytes'], 1):.2f}x smaller"])
    compiled = paths.stage_dir("compile")
    base_onnx, int8 = compiled / "base" / "model.onnx", compiled / "compressed" / "model.int8.onnx"
    if base_onnx.is_file() and int8.is_file():
        b, c = base_onnx.stat().st_size, int8.stat().st_size
        rows.append(["ONNX file bytes (fp32 -> int8)", _fmt_int(b), _fmt_int(c), f"{b / c:.2f}x smaller"])
    bench = paths.stage_dir("benchmark") / "latency.json"
    if bench.exists():
        lat = read_json(bench)
        for r in lat["pairs"]:
            rows.append([
                f"latency {r['engine']} {r['target']} b{r['batch']} (ms, median)",
                f"{r['base_ms']:.3f}",
                f"{r['compressed_ms']:.3f}",
                f"{r['speedup']:.2f}x faster",
            ])
    return ["", "base", "compressed", "ratio"], rows


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def where_to_look(paths: RunPaths) -> list[str]:
    uri = tracking_uri(paths)
    lines = [f"artifacts: {paths.run_dir}"]
    if uri.startswith("sqlite:///"):
        lines.append(f"MLflow:    mlflow ui --backend-store-uri {uri} --host 127.0.0.1  (or: make up)")
    else:
        lines.append(f"MLflow:    {uri}")
    return lines


def goal_line(paths: RunPaths) -> str:
    """The verdict and each part of the goal that was set, marked where it was missed."""
    comp = read_json(paths.require("finetune", "metrics.json"))
    verdict = "MET" if comp["goal_met"] else "NOT MET"
    parts = [f"{comp['macs_reduction']:.2f}x fewer MACs"]
    if "eager_latency_reduction" in comp:
        parts.append(f"{comp['eager_latency_reduction']:.2f}x faster (eager b1, interleaved)")
    for key, text in (("goal_speedup_met", "speedup"), ("goal_size_met", "size"), ("goal_latency_met", "latency")):
        if comp.get(key) is False:
            parts.append(f"{text} limit missed")
    if "packed_bytes" in comp:
        parts.append(f"{comp['packed_bytes'] / 1e6:.3f} MB packed")
    parts.append(f"accuracy drop {comp['accuracy_drop']:+.2f} pt" + ("" if comp.get("goal_accuracy_met", True) else " (over the limit)"))
    return f"goal {verdict}: " + ", ".join(parts)


def search_line(paths: RunPaths) -> str | None:
    f = paths.stage_dir("search") / "choice.json"
    if not f.is_file():
        return None
    c = read_json(f)
    if c.get("trial") is None:
        return f"search: {c.get('why', 'off')}"
    return f"search: trial {c['trial']} of study {c.get('study')}: {c['why']}"


def coverage_lines(paths: RunPaths, examples: int = 3) -> list[str]:
    """Markdown lines on what the plan reached: the share of the base model's MACs in layers an op
    changed, each op's applied count, and its skipped (or reverted) layers grouped by reason."""
    from compression_ops.coverage import UNREPORTED, skipped_by_reason

    f = paths.stage_dir("finetune") / "coverage.json"
    if not f.is_file():
        return []
    cov = read_json(f)
    lines = [f"The plan's ops changed layers holding {cov['macs_covered_fraction']:.1%} of the base model's "
             f"MACs ({_fmt_int(cov['macs_covered'])} of {_fmt_int(cov['macs_total'])}"
             + (f"; {_fmt_int(cov['functional_macs'])} of those are attention matmuls outside any layer, "
                "which no op changes directly" if cov.get("functional_macs") else "") + ").", ""]
    grouped = skipped_by_reason(cov)
    for op in cov["ops"]:
        applied = sum(row["ops"].get(op) == "applied" for row in cov["layers"].values())
        parts = []
        for why, names in sorted(grouped.get(op, {}).items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(f"`{n}`" for n in names[:examples]) + (", ..." if len(names) > examples else "")
            parts.append(f"{len(names)} {why} ({shown})")
        if op in cov.get("reverted", {}):
            lines.append(f"- **{op}**: reverted, the plan went on without it: {cov['reverted'][op]}")
            continue
        if all(row["ops"].get(op) == UNREPORTED for row in cov["layers"].values()):
            lines.append(f"- **{op}**: its report does not list the layers it changed")
            continue
        lines.append(f"- **{op}**: applied to {applied} layer(s)" + (f"; {'; '.join(parts)}" if parts else ""))
    return lines


def stage_rows(state: dict[str, Any]) -> list[list[str]]:
    """stage, ran / reused, and why: what changed when it ran, whose output when it was reused."""
    from tasks.stage_specs import STAGES

    rows = []
    recorded = state.get("stages", {})
    for stage, rec in ((s, recorded[s]) for s in STAGES if s in recorded):
        if rec.get("reused"):
            rows.append([stage, f"reused from {rec.get('reused_from')}", rec.get("reason", "")])
        else:
            rows.append([stage, "ran", rec.get("changed", "")])
    return rows


def nothing_changed(state: dict[str, Any]) -> bool:
    """The register stage was reused: no input of the chain changed, so the registry was left alone."""
    return bool(state.get("stages", {}).get("register", {}).get("reused"))


NOTHING_CHANGED = "nothing changed; the champion stays"


def print_run_summary(paths: RunPaths) -> None:
    state: dict[str, Any] = paths.read_state()
    done = len(state.get("stages", {}))
    if isinstance(state.get("frontier"), dict) and "points" in state["frontier"]:  # a frontier run: data and base
        print(f"\nshrinkflow frontier run {paths.pipeline}/{paths.run_id}: {done} stages here, then one run per point")
    else:
        print(f"\nshrinkflow run {paths.pipeline}/{paths.run_id}: {done}/8 stages done")
    if rows := stage_rows(state):
        print(render_table(["stage", "ran / reused", "why"], rows))
    if nothing_changed(state):
        print(NOTHING_CHANGED)
    if (paths.stage_dir("finetune") / "metrics.json").exists():
        print(render_table(*summary_rows(paths)))
        print(goal_line(paths))
    if line := search_line(paths):
        print(line)
    if (f := paths.run_dir / "frontier" / "frontier.json").is_file():
        from tasks.frontier import frontier_table

        doc = read_json(f)
        print(f"frontier: {len(doc['points'])} points, each its own run ({', '.join(p['run_id'] for p in doc['points'])})")
        print(frontier_table(doc))
        print(f"plot and report: {f.parent / 'frontier.png'}, {f.parent / 'report.md'}")
    for line in where_to_look(paths):
        print(line)


def write_report(paths: RunPaths, dest: Path) -> None:
    header, rows = summary_rows(paths)
    state = paths.read_state()
    text = [f"# shrinkflow run {paths.pipeline}/{paths.run_id}", "", goal_line(paths), "",
            search_line(paths) or "", "", render_markdown(header, rows), ""]
    if cov := coverage_lines(paths):
        text += ["## Coverage: layers the plan changed", "", *cov, ""]
    if stages := stage_rows(state):
        text += ["## Stages: ran or reused", "", render_markdown(["stage", "ran / reused", "why"], stages), ""]
    bench = paths.stage_dir("benchmark")
    if (bench / "latency.txt").is_file():
        lat = read_json(bench / "latency.json")
        text += ["## Latency per target and engine", "",
                 "Engines on this machine were timed interleaved in one process; an RPC device on the device "
                 "itself. A target marked (emulated) ran under qemu: its figures are not that CPU's speed.", "",
                 "```", (bench / "latency.txt").read_text().rstrip(), "```", ""]
        for target, per in lat.get("best", {}).items():
            text.append(f"- fastest engine for the compressed model on {target}: "
                        + ", ".join(f"batch {b}: {v['engine']} ({v['median_ms']:.3f} ms)" for b, v in per.items()))
        text.append("")
    dest.write_text("\n".join(text))
