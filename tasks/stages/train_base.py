"""Stage 2: train the reference model (or import the user's weights) and measure it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression_ops import TrainSpec, evaluate, fit
from tasks.context import StageContext
from tasks.errors import ModelLoadError
from tasks.measure import measure_model
from tasks.models.checkpoint import save_checkpoint
from tasks.models.sources import load_base, state_dict_sha256
from tasks.models.user import arch_of
from tasks.progress import epoch_bar, say
from tasks.workspace import write_json


def arch_record(ctx: StageContext) -> dict[str, Any]:
    return arch_of(ctx.cfg.model)


def check_io(model: nn.Module, input_shape: list[int], num_classes: int, what: str) -> None:
    """Fail early, and clearly, when the model cannot take the data's images or has the wrong outputs."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise ModelLoadError(
            f"{what} does not accept inputs of shape [N, {', '.join(map(str, input_shape))}] that the data "
            f"provides ({type(e).__name__}: {e}). Fix the model's input channels/size or the data settings."
        ) from e
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ModelLoadError(
            f"{what} outputs shape {list(out.shape)} but the data has {num_classes} classes; "
            "the model must return logits of shape [N, num_classes]"
        )


def run(ctx: StageContext, out: Path) -> dict[str, Any]:
    info = ctx.data_info()
    shape, n_cls = info["input_shape"], info["num_classes"]
    arch = arch_record(ctx)
    tc = ctx.cfg.train
    torch.manual_seed(tc.seed)
    # With model.weights (a file, models:/ or runs:/) the imported weights are the base: no training.
    model, base = load_base(ctx.cfg.model, in_channels=shape[0], num_classes=n_cls, workspace=ctx.paths.root)
    what = f"model {ctx.cfg.model.label()}"
    check_io(model, shape, n_cls, what)
    sp = ctx.splits()
    history: list[dict] = []
    if base is not None:
        ctx.tracker.tags(base.tags())
        ctx.tracker.tags(base.tags(), on_parent=True)
        pinned = f" ({base.resolved})" if base.resolved != base.uri else ""
        say(f"imported weights from {base.uri}{pinned}, sha256 {base.sha256[:12]}")
    if tc.epochs > 0 and base is None:
        spec = TrainSpec(
            epochs=tc.epochs,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            label_smoothing=tc.label_smoothing,
            schedule="onecycle",
            seed=tc.seed,
            optimizer=tc.optimizer,
        )
        ctx.tracker.params({"train": tc.model_dump(), "model": arch})
        history = fit(
            model,
            sp.batches("train", tc.batch_size, train=True, augment=tc.augment, seed=tc.seed),
            spec,
            val=sp.batches("val"),
            wrap_epoch=epoch_bar("base", tc.epochs),
            on_epoch=lambda e, row: (
                ctx.tracker.metrics(row, step=e),
                say(f"base epoch {e}: val accuracy {row['val_accuracy']:.2f}%"),
            ),
        )
    val = evaluate(model, sp.batches("val"))
    test = evaluate(model, sp.batches("test"))
    metrics = {
        "val_accuracy": val["accuracy"],
        "test_accuracy": test["accuracy"],
        "epochs": tc.epochs if base is None else 0,
        **measure_model(model, ctx.example(1)),
    }
    size = save_checkpoint(
        model, out / "model.pt", arch=arch, input_shape=shape, num_classes=n_cls, meta={"stage": "train_base"}
    )
    metrics["checkpoint_bytes"] = size
    # Lineage: where the base's weights came from and their content hash (trained here: the hash only).
    lineage = base.record() if base is not None else {"source": "trained", "sha256": state_dict_sha256(model.state_dict())}
    write_json(out / "base.json", lineage)
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history)
    ctx.tracker.metrics(metrics)
    ctx.tracker.artifact(out / "metrics.json")
    ctx.tracker.artifact(out / "base.json")
    say(f"base model: test accuracy {test['accuracy']:.2f}%, {metrics['macs'] / 1e6:.2f} M MACs")
    return {"test_accuracy": test["accuracy"], "val_accuracy": val["accuracy"], "macs": metrics["macs"],
            "base_model": {k: lineage.get(k) for k in ("source", "uri", "resolved", "version", "run_id", "sha256")}}
