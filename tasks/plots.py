"""PNG figures for reports and MLflow: layer sensitivity (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sensitivity(scans: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """One panel per scan (channel pruning, weight bits): accuracy drop per layer, a line per setting."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(scans), 1, figsize=(9, 3.2 * len(scans)), squeeze=False)
    for ax, sc in zip(axes[:, 0], scans, strict=True):
        layers = list(dict.fromkeys(r["layer"] for r in sc["rows"]))
        settings = list(dict.fromkeys(r["setting"] for r in sc["rows"]))
        for s in settings:
            drops = [next(r["drop"] for r in sc["rows"] if r["layer"] == lay and r["setting"] == s) for lay in layers]
            label = f"ratio {s}" if sc["kind"] == "channel_prune" else f"{s} bits"
            ax.plot(range(len(layers)), drops, marker="o", label=label)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("accuracy drop (pt)")
        ax.set_title(f"{sc['kind']}: one layer at a time (base {sc['base_accuracy']:.2f}%)", fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """Lay out and write the figure atomically (temp file, then rename), then free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, grid and legend of a one-panel figure, then _save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


COST_KEYS = {"macs": ("macs", 1e-6, "MACs per image (M)"), "size": ("size_mb", 1.0, "packed size (MB)"),
             "latency": ("latency_ms", 1.0, "batch-1 latency (ms, eager)")}


def plot_pareto(rows: list[dict[str, Any]], path: Path, *, cost: str, chosen: int | None, title: str = "") -> Path:
    """Validation accuracy against cost for every completed trial; the non-dominated front joined,
    trials missing the goal's cost limits hollow, the chosen one starred."""
    plt = _pyplot()
    key, scale, label = COST_KEYS[cost]
    pts = [(r[key] * scale, r["val_accuracy"], r) for r in rows if r.get(key) is not None and r.get("val_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if pts:
        front = [p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in pts)]
        front.sort(key=lambda p: p[0])
        feas = [p for p in pts if p[2]["feasible"]]
        infeas = [p for p in pts if not p[2]["feasible"]]
        ax.scatter([p[0] for p in feas], [p[1] for p in feas], c="tab:blue", label="meets cost limits", zorder=2)
        ax.scatter([p[0] for p in infeas], [p[1] for p in infeas], facecolors="none", edgecolors="tab:gray",
                   label="misses a cost limit", zorder=2)
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", c="tab:orange", label="Pareto front", zorder=1)
        for p in pts:
            ax.annotate(str(p[2]["trial"]), (p[0], p[1]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ch = [p for p in pts if p[2]["trial"] == chosen]
        if ch:
            ax.scatter([ch[0][0]], [ch[0][1]], marker="*", s=250, c="tab:red", label=f"chosen (trial {chosen})", zorder=3)
    return _finish(plt, fig, ax, path, label, "validation accuracy after the trial's fine-tune (%)",
                   title or "search trials")


def plot_efficiency(curves: dict[str, list[dict[str, Any]]], path: Path, title: str = "",
                    reference: dict[str, float] | None = None) -> Path:
    """Best feasible validation accuracy after each trial, one line per search method; optional
    horizontal reference lines (e.g. the uniform plan)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, eff in curves.items():
        xs = [e["trial"] + 1 for e in eff if e["best_feasible_val_accuracy"] is not None]
        ys = [e["best_feasible_val_accuracy"] for e in eff if e["best_feasible_val_accuracy"] is not None]
        ax.step(xs, ys, where="post", marker="o", ms=3, label=name)
    for name, y in (reference or {}).items():
        ax.axhline(y, ls="--", c="gray", lw=1)
        ax.annotate(name, (1, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    return _finish(plt, fig, ax, path, "trials run", "best feasible validation accuracy (%)", title)
