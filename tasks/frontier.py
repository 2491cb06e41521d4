"""A frontier run (goal.frontier): one compressed model per speedup, from one pipeline run.

The run R prepares the data and trains (or imports) the base once. Each point p then runs the rest of
the chain as its own point run, `R--<p>x`, whose run.json carries R's overrides with goal.speedup = p:
search, compress, finetune, compile, benchmark and register. Its prepare_data and train_base are
reused from R by the stage cache (same inputs, same fingerprint). Each point registers as its own
model, shrinkflow-<pipeline>-<p>x, so each has its own champion and gate on nightly runs.

`collect` then gathers every point's accuracy, MACs and measured latency into R's `frontier/` folder:
frontier.json, frontier.png (accuracy against MACs and against measured latency per target) and
report.md, all logged to R's MLflow run.

Light at module top (no torch, MLflow or matplotlib): the DAG file imports the naming helpers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError, StageError

__all__ = ["collect", "point_group_id", "point_label", "point_run_id", "start_point"]

SEP = "--"  # between the frontier run's id and the point's label: R--2x, R--2.5x
FOLDER = "frontier"


def point_label(point: float) -> str:
    """2.0 -> '2x', 2.5 -> '2.5x': in run ids, registered model names and the report."""
    return f"{point:g}x"


def point_group_id(point: float) -> str:
    """The point's Airflow task group id (task ids allow no '.'): 2.5 -> 'point_2_5x'."""
    return "point_" + point_label(point).replace(".", "_")


def point_run_id(run_id: str, point: float) -> str:
    return f"{run_id}{SEP}{point_label(point)}"


def _point_force(force: bool | str | None) -> bool | str | None:
    """A point run inherits R's force from the search on: its data and base are R's, never recomputed."""
    if force is True or force in ("prepare_data", "train_base"):
        return "search"
    return force


def _frontier_cfg(pipeline: str, run_id: str, config_path: Any, workspace: Any):
    from tasks.overrides import run_config
    from tasks.workspace import run_paths

    paths = run_paths(pipeline, run_id, workspace)
    state = paths.read_state()
    if "overrides" not in state:
        raise StageError(f"run {pipeline}/{run_id} was not started (no run.json with its overrides): start the "
                         "frontier run first (its DAG's start task, or shrinkflow run)")
    cfg = run_config(pipeline, state, config_path)
    if not cfg.goal.frontier:
        raise ConfigError(f"pipeline {pipeline!r} has no goal.frontier; a frontier run needs e.g. "
                          "goal: {frontier: [2, 3, 5]} in pipelines.yaml")
    return cfg, paths, state


def start_point(pipeline: str, run_id: str, point: float, *, config_path: Any = None,
                workspace: Any = None) -> str:
    """Write the point run's run.json (R's overrides, goal.speedup = point, R's force from the search on);
    returns the point run's id. Re-running it (a cleared task) rewrites the same state."""
    from tasks.workspace import run_paths

    cfg, _, state = _frontier_cfg(pipeline, run_id, config_path, workspace)
    if point not in cfg.goal.frontier:
        raise ConfigError(f"{point_label(point)} is not a point of {pipeline}'s goal.frontier "
                          f"({', '.join(map(point_label, cfg.goal.frontier))})")
    overrides = copy.deepcopy(state.get("overrides") or {})
    overrides["goal"] = {**overrides.get("goal", {}), "speedup": point, "frontier": None}
    paths = run_paths(pipeline, point_run_id(run_id, point), workspace)
    paths.update_state(pipeline=pipeline, run_id=paths.run_id, overrides=overrides,
                       force=_point_force(state.get("force")),
                       frontier={"of": run_id, "point": point, "label": point_label(point)})
    return paths.run_id


def frontier_point(state: dict[str, Any]) -> str | None:
    """The point label of a point run (from its run.json), None for any other run."""
    f = state.get("frontier")
    return f.get("label") if isinstance(f, dict) else None


# ------------------------------------------------------------------ collect


def _best_ms(rows: list[dict[str, Any]], model: str, target: str, batch: int) -> dict[str, Any] | None:
    mine = [r for r in rows if r["model"] == model and r["target"] == target and r["batch"] == batch]
    if not mine:
        return None
    r = min(mine, key=lambda r: r["median_ms"])
    return {"engine": r["engine"], "median_ms": r["median_ms"], "emulated": r.get("emulated")}


def _latency(paths: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per target at the smallest batch: the base's and the compressed model's fastest engine and time."""
    from tasks.workspace import read_json

    f = paths.stage_dir("benchmark") / "latency.json"
    if not f.is_file():
        return {}, {}
    rows = read_json(f)["rows"]
    base, comp = {}, {}
    for target in sorted({r["target"] for r in rows}):
        batch = min(r["batch"] for r in rows if r["target"] == target)
        b, c = _best_ms(rows, "base", target, batch), _best_ms(rows, "compressed", target, batch)
        if b and c:
            base[target] = {**b, "batch": batch}
            comp[target] = {**c, "batch": batch, "speedup": b["median_ms"] / c["median_ms"]}
    return base, comp


def _point_row(pipeline: str, run_id: str, point: float, base: dict[str, Any], workspace: Any) -> dict[str, Any]:
    from tasks.workspace import read_json, run_paths

    paths = run_paths(pipeline, point_run_id(run_id, point), workspace)
    for stage in ("finetune", "benchmark", "register"):  # with an object store: what this worker lacks
        paths.pull(stage)
    fin = read_json(paths.require("finetune", "metrics.json"))
    reg = paths.stage_dir("register") / "decision.json"
    if not reg.is_file():
        raise StageError(f"the point was not registered ({reg} is missing)")
    decision = read_json(reg)
    base_lat, lat = _latency(paths)
    return {
        "point": point, "label": point_label(point), "run_id": paths.run_id,
        "test_accuracy": fin["test_accuracy"], "accuracy_drop": base["test_accuracy"] - fin["test_accuracy"],
        "macs": fin["macs"], "params": fin["params"], "macs_reduction": base["macs"] / max(fin["macs"], 1),
        "goal_met": bool(fin.get("goal_met")), "latency": lat, "base_latency": base_lat,
        "registered": {"model": decision["model"], "version": decision["version"], "alias": decision["alias"],
                       "promoted": decision["promoted"]},
    }


def collect(pipeline: str, run_id: str, *, config_path: Any = None, workspace: Any = None) -> dict[str, Any]:
    """Gather the points into R's frontier/ (JSON, plot, report), log them to R's MLflow run; a summary.

    A point whose chain failed is listed under `missing` with why, and the others are still collected;
    then a StageError names the missing points, so the DAG run fails (and alerts) with the frontier written."""
    from tasks import tracking
    from tasks.progress import say
    from tasks.registry import client_for
    from tasks.workspace import atomic_dir, read_json, run_paths, write_json

    cfg, paths, _ = _frontier_cfg(pipeline, run_id, config_path, workspace)
    paths.pull("train_base")
    base = read_json(paths.require("train_base", "metrics.json"))
    rows, missing = [], {}
    for p in cfg.goal.frontier:
        try:
            rows.append(_point_row(pipeline, paths.run_id, p, base, workspace))
        except StageError as e:  # that point's chain did not finish
            missing[point_label(p)] = f"{e} (task group {point_group_id(p)}, run {point_run_id(paths.run_id, p)})"
    if not rows:
        raise StageError(f"no point of {pipeline}/{paths.run_id}'s frontier finished: "
                         + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    doc = {"pipeline": pipeline, "run_id": paths.run_id, "metric": cfg.goal.metric,
           "max_accuracy_drop": cfg.goal.max_accuracy_drop,
           "base": {"test_accuracy": base["test_accuracy"], "macs": base["macs"], "params": base["params"]},
           "points": rows, "missing": missing}
    with atomic_dir(paths.run_dir / FOLDER) as out:
        out = Path(out)
        write_json(out / "frontier.json", doc)
        plot_frontier(doc, out / "frontier.png")
        (out / "report.md").write_text(report_markdown(doc))
    folder = paths.run_dir / FOLDER
    paths.publish(FOLDER)
    paths.update_state(frontier={"points": [r["label"] for r in rows], "folder": FOLDER})
    client = client_for(paths)
    parent = tracking.parent_run_id(paths, {"shrinkflow.frontier": ",".join(r["label"] for r in rows)})
    for r in rows:
        prefix = f"frontier.{r['label']}"
        metrics = {f"{prefix}.test_accuracy": r["test_accuracy"], f"{prefix}.accuracy_drop": r["accuracy_drop"],
                   f"{prefix}.macs_reduction": r["macs_reduction"]}
        metrics.update({f"{prefix}.latency_ms.{t}": v["median_ms"] for t, v in r["latency"].items()})
        for k, v in metrics.items():
            client.log_metric(parent, k, float(v))
        # each point's own MLflow run names the frontier run it belongs to
        tracking.parent_run_id(run_paths(pipeline, r["run_id"], workspace),
                               {"shrinkflow.frontier_of": paths.run_id, "shrinkflow.frontier_point": r["label"]})
    for name in ("frontier.json", "frontier.png", "report.md"):
        client.log_artifact(parent, str(folder / name), FOLDER)
    tracking.finish_parent(paths)
    say(f"frontier of {pipeline}/{paths.run_id}:\n{frontier_table(doc)}\n(plot: {folder / 'frontier.png'})")
    if missing:
        tracking.finish_parent(paths, "FAILED")
        raise StageError(f"frontier collected with {len(rows)} of {len(cfg.goal.frontier)} points; missing: "
                         + "; ".join(f"{k}: {v}" for k, v in missing.items())
                         + ". Fix that point's failed task, clear it, then clear this task")
    return {"points": [{k: r[k] for k in ("label", "test_accuracy", "macs_reduction", "goal_met", "registered")}
                       for r in rows], "folder": str(folder)}


# ------------------------------------------------------------------ rendering


def _targets(doc: dict[str, Any]) -> list[str]:
    return sorted({t for r in doc["points"] for t in r["latency"]})


def frontier_table(doc: dict[str, Any]) -> str:
    """One line per point (and the base): accuracy, drop, MACs reduction, measured latency per target."""
    from tasks.report import render_table

    header, rows = _table_rows(doc)
    return render_table(header, rows)


def _table_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    targets = _targets(doc)
    header = ["point", "accuracy %", "drop pt", "MACs", "goal", *(f"{t} ms (speedup)" for t in targets),
              "registered"]
    base = doc["base"]
    first = doc["points"][0] if doc["points"] else {"base_latency": {}}
    rows = [["base", f"{base['test_accuracy']:.2f}", "", "1.00x", "",
             *(f"{first['base_latency'][t]['median_ms']:.3f}" if t in first["base_latency"] else "-"
               for t in targets), ""]]
    for r in doc["points"]:
        reg = r["registered"]
        rows.append([
            r["label"], f"{r['test_accuracy']:.2f}", f"{r['accuracy_drop']:.2f}", f"{r['macs_reduction']:.2f}x",
            "met" if r["goal_met"] else "missed",
            *(f"{r['latency'][t]['median_ms']:.3f} ({r['latency'][t]['speedup']:.2f}x)" if t in r["latency"] else "-"
              for t in targets),
            f"{reg['model']} v{reg['version']} ({reg['alias']})" if reg else "-",
        ])
    return header, rows


def report_markdown(doc: dict[str, Any]) -> str:
    from tasks.report import render_markdown

    header, rows = _table_rows(doc)
    lines = [f"# shrinkflow frontier {doc['pipeline']}/{doc['run_id']}", "",
             f"One compressed model per point (speedup in {doc['metric']}; at most "
             f"{doc['max_accuracy_drop']} pt of accuracy lost), each compressed (searched, when the pipeline "
             "searches), fine-tuned, compiled, measured on its targets and registered as its own model. Latency: the fastest engine per target at the "
             "smallest benchmark batch, base and compressed measured side by side in each point's benchmark.",
             "", render_markdown(header, rows), "", "![frontier](frontier.png)", ""]
    lines += [f"- {r['label']}: run `{r['run_id']}`" for r in doc["points"]]
    lines += [f"- {label}: **missing**, {why}" for label, why in doc.get("missing", {}).items()]
    emulated = sorted({t for r in doc["points"] for t, v in r["latency"].items() if v.get("emulated")})
    if emulated:
        lines += ["", f"Targets timed under an emulator ({', '.join(emulated)}): their times are not that CPU's speed."]
    return "\n".join(lines) + "\n"


def plot_frontier(doc: dict[str, Any], path: Path) -> Path:
    """Accuracy against MACs, and against measured latency for each target (base and every point)."""
    from tasks.plots import _pyplot, _save

    plt = _pyplot()
    targets = _targets(doc)
    fig, axes = plt.subplots(1, 1 + len(targets), figsize=(4.6 * (1 + len(targets)), 3.8), squeeze=False)
    base, pts = doc["base"], doc["points"]
    ax = axes[0, 0]
    ax.plot([p["macs"] / 1e6 for p in pts], [p["test_accuracy"] for p in pts], marker="o", label="compressed")
    ax.scatter([base["macs"] / 1e6], [base["test_accuracy"]], marker="*", s=120, color="k", label="base", zorder=3)
    for p in pts:
        ax.annotate(p["label"], (p["macs"] / 1e6, p["test_accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against MACs", fontsize=9)
    for ax, t in zip(axes[0, 1:], targets, strict=True):
        have = [p for p in pts if t in p["latency"]]
        ax.plot([p["latency"][t]["median_ms"] for p in have], [p["test_accuracy"] for p in have], marker="o")
        for p in have:
            ax.annotate(f"{p['label']} {p['latency'][t]['engine']}", (p["latency"][t]["median_ms"], p["test_accuracy"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        b = next((p["base_latency"][t] for p in have if t in p["base_latency"]), None)
        if b:
            ax.scatter([b["median_ms"]], [base["test_accuracy"]], marker="*", s=120, color="k", zorder=3)
        batch = have[0]["latency"][t]["batch"] if have else 1
        emu = " (emulated)" if any(p["latency"][t].get("emulated") for p in have) else ""
        ax.set_xlabel(f"latency on {t}{emu}, batch {batch}, fastest engine (ms)")
        ax.set_title(f"accuracy against measured latency: {t}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{doc['pipeline']}/{doc['run_id']}: frontier", fontsize=10)
    return _save(plt, fig, path)
