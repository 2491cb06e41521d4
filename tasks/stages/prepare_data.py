"""Stage 1: load the declared data, split it (validation from train, test untouched), store it by hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.context import StageContext
from tasks.data import build_dataset, save_dataset
from tasks.progress import say
from tasks.workspace import write_json


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    ds = build_dataset(ctx.cfg.data)
    digest = save_dataset(ds, ctx.paths.datasets_dir, out / "dataset.npz")
    summary = ds.summary()
    write_json(out / "dataset.json", summary)
    say(f"data {ds.source}: {summary['sizes']} images of {list(ds.input_shape)}, hash {digest[:12]}")
    ctx.tracker.params({"data": ctx.cfg.data.model_dump(exclude_none=True)})
    ctx.tracker.metrics({f"n_{k}": v for k, v in summary["sizes"].items()})
    ctx.tracker.tags({"data_hash": digest})
    ctx.tracker.tags({"data_hash": digest, "data_source": ds.source}, on_parent=True)
    return {"hash": digest, "sizes": summary["sizes"], "input_shape": summary["input_shape"]}
