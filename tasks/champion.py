"""Champion and challenger on equal terms: the same current test split, the same host, timed together.

Each package runs through its own deployed engine (tasks/serving.Package: deploy.json's choice, with
its fallbacks), so the figures are those of what is served. Each model gets the test split's raw
pixels normalised with its own training mean/std (a package registered before serving.json existed
gets this run's normalisation). Latency: both at one batch size, interleaved in one process
(tasks/engines/timing.py) with the benchmark's thread count, so drift hits both alike. Recorded
figures from the models' own runs are never used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.engines.timing import set_threads, time_interleaved
from tasks.gate import Figures
from tasks.serving import Package

EVAL_BATCH = 256


def _inputs(pkg: Package, pixels: np.ndarray, normalised: np.ndarray) -> np.ndarray:
    """The test split as this package's model expects it."""
    if pkg.info.get("mean") is not None and pkg.info.get("std") is not None:
        return pkg.normalise(pixels)
    return normalised


def _macs(pkg: Package) -> int | None:
    import torch

    from compression_ops.metrics import count_macs
    from tasks.models.checkpoint import load_checkpoint

    model, payload = load_checkpoint(pkg.root / "model.pt")
    return count_macs(model, torch.zeros(1, *payload["input_shape"]))


def accuracy(pkg: Package, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of the package's deployed engines on x, in batches of EVAL_BATCH."""
    logits = np.concatenate([pkg.run(x[i: i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
    return float(100.0 * (logits.argmax(1) == y).mean())


def side_by_side(packages: dict[str, Package], pixels: np.ndarray, normalised: np.ndarray, y: np.ndarray,
                 *, batch: int, threads: int, warmup: int, repeat: int) -> dict[str, Figures]:
    """Figures of every package (challenger, champion) on the same split and host, timed interleaved."""
    xs = {k: _inputs(p, pixels, normalised) for k, p in packages.items()}
    batch = min(batch, len(y))
    with set_threads(threads):
        acc = {k: accuracy(p, xs[k], y) for k, p in packages.items()}
        timed = {k: np.ascontiguousarray(xs[k][:batch]) for k in packages}
        fns = {k: (lambda p=p, x=timed[k]: p.run(x)) for k, p in packages.items()}
        lat = time_interleaved(fns, warmup, repeat)
    return {k: Figures(test_accuracy=acc[k], latency_ms=lat[k]["median_ms"], macs=_macs(p),
                       size_bytes=p.artifact_bytes(batch), engine=p.engine_for(batch))
            for k, p in packages.items()}


def figures_table(figs: dict[str, Figures]) -> str:
    """One line per model: engine, accuracy, latency, MACs, size."""
    from tasks.report import render_table

    rows = [[k, f.engine, f"{f.test_accuracy:.2f}", f"{f.latency_ms:.3f}" if f.latency_ms is not None else "-",
             f"{f.macs:,}" if f.macs is not None else "-", f"{f.size_bytes / 1e3:.1f}" if f.size_bytes else "-"]
            for k, f in figs.items()]
    return render_table(["model", "engine", "test acc %", "latency ms (median)", "MACs", "artifact kB"], rows)


def as_metrics(figs: dict[str, Figures]) -> dict[str, Any]:
    """Flat MLflow metrics: challenger.test_accuracy, champion.latency_ms, ..."""
    out: dict[str, Any] = {}
    for k, f in figs.items():
        for key in ("test_accuracy", "latency_ms", "macs", "size_bytes"):
            if getattr(f, key) is not None:
                out[f"{k}.{key}"] = float(getattr(f, key))
    return out
