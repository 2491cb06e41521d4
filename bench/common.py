"""Shared by the bench scripts: Fashion-MNIST splits and converged base models, cached on disk.

Bases are trained once per (model, recipe, data) and kept under .shrinkflow/bench/bases/, so every
benchmark compares against the same converged network.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tasks  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads)
from compression_ops import TrainSpec, evaluate, fit  # noqa: E402
from tasks.config import DataConfig  # noqa: E402
from tasks.data import build_dataset  # noqa: E402
from tasks.data.loaders import Splits  # noqa: E402
from tasks.models import create_model  # noqa: E402
from tasks.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

CACHE = ROOT / ".shrinkflow" / "bench"
RESULTS = ROOT / "bench" / "results"

# Recipes that converge on Fashion-MNIST on this machine (validation accuracy flat over the last epochs).
BASES: dict[str, dict[str, Any]] = {
    "resnet8": {"arch": {"name": "resnet8", "kwargs": {"width": 16}},
                "train": {"epochs": 20, "lr": 0.2, "label_smoothing": 0.05, "schedule": "onecycle"}},
    "mobilenet_tiny": {"arch": {"name": "mobilenet_tiny", "kwargs": {"width": 1.0}},
                       "train": {"epochs": 20, "lr": 0.2, "label_smoothing": 0.05, "schedule": "onecycle"}},
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fashion_splits(train_subset: int | None = None) -> Splits:
    return Splits(build_dataset(DataConfig(source="fashion_mnist", val_fraction=0.1, train_subset=train_subset)))


def base_model(key: str, splits: Splits):
    """The converged base for `key` (trained now if not cached); returns (model, info dict)."""
    recipe = BASES[key]
    tag = hashlib.sha256(json.dumps([recipe, splits.ds.content_hash()], sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / "bases" / f"{key}-{tag}.pt"
    if path.is_file():
        model, info = load_checkpoint(path)
        return model, info["meta"]
    model = create_model(recipe["arch"]["name"], in_channels=1, num_classes=10, **recipe["arch"]["kwargs"])
    spec = TrainSpec(**recipe["train"])
    t0 = time.perf_counter()
    hist = fit(model, splits.batches("train", 128, train=True, augment=True, seed=0), spec,
               val=splits.batches("val"),
               on_epoch=lambda e, row: say(f"  {key} epoch {e}: val {row['val_accuracy']:.2f}%"))
    meta = {
        "recipe": recipe,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "val_history": [round(r["val_accuracy"], 2) for r in hist],
        "test_accuracy": evaluate(model, splits.batches("test"))["accuracy"],
    }
    save_checkpoint(model, path, arch=recipe["arch"], input_shape=[1, 28, 28], num_classes=10, meta=meta)
    say(f"{key}: trained in {meta['train_seconds']} s, test {meta['test_accuracy']:.2f}%")
    return model, meta


if __name__ == "__main__":  # python bench/common.py: train (or load) every base
    sp = fashion_splits()
    for k in BASES:
        _, m = base_model(k, sp)
        say(f"{k}: test {m['test_accuracy']:.2f}%, val by epoch {m['val_history']}")
