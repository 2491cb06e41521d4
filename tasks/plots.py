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
