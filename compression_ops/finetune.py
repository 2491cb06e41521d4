"""Training and fine-tuning loops, with optional distillation from a teacher. No I/O: callers observe
progress through `wrap_epoch` (e.g. a progress bar) and `on_epoch` (e.g. metric logging)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compression_ops.base import Batches, TrainHook, check_range
from compression_ops.distill import AttentionTransfer, Distill, FeatureHint, kd_loss

OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass
class TrainSpec:
    epochs: int
    lr: float
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.0
    schedule: str = "cosine"  # "onecycle" from scratch (warm-up), "cosine" for fine-tuning
    seed: int = 0
    # sgd: SGD + Nesterov momentum (convnets); adamw: AdamW (transformers, which SGD trains poorly)
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 0, 10_000)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        if self.schedule not in ("cosine", "onecycle"):
            raise ValueError(f"schedule={self.schedule!r}: expected 'cosine' or 'onecycle'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")


def _to_cl(x: torch.Tensor) -> torch.Tensor:
    # channels_last halves conv time on CPU for these small networks (measured, oneDNN).
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def channels_last_safe(*models: nn.Module) -> bool:
    """Whether training in channels_last is safe. torch 2.13's CPU conv backward (oneDNN) corrupts the
    heap (double free, "free(): invalid next size", segfault) in two shapes pruning easily produces:
    * a conv with fewer than 8 output channels;
    * a strided 1x1 conv (a ResNet shortcut) with 3 to 15 input channels per group, on an odd-sized
      batch (a last ragged batch, a search trial's small subset). Mapped over kernel 1/3, stride 1-4,
      1-65 input channels, depthwise and batches 1-129: only this case crashed, and never at even
      batches; cut at 16 channels, and applied whatever the batch, since fit() cannot know every batch.
    Such models train in the default layout (tests/compression_ops/test_channels_last.py)."""
    for model in models:
        for m in model.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            if m.out_channels < 8:
                return False
            if m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels // m.groups < 16:
                return False
    return True


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer): where fit() and evaluate() put each batch."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def evaluate(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Top-1 accuracy in percent and mean cross-entropy. Batches may live on the CPU: each is moved to
    the model's device."""
    model.eval()
    device = model_device(model)
    total = 0
    # summed on the device (float64, exact for the counts) and read once: no host sync per batch
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            total += len(y)
    if total == 0:
        raise ValueError("evaluate() got no batches")
    return {"accuracy": 100.0 * int(correct) / total, "loss": float(loss) / total, "n": total}


def fit(
    model: nn.Module,
    train: Batches,
    spec: TrainSpec,
    *,
    teacher: nn.Module | None = None,
    distill: Distill | None = None,
    val: Batches | None = None,
    wrap_epoch: Callable[[Iterable, int], Iterable] | None = None,
    on_epoch: Callable[[int, dict[str, float]], Any] | None = None,
    hooks: list[TrainHook] | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place with SGD + Nesterov (or AdamW: spec.optimizer); distil from `teacher` when both it and `distill` are given.

    Returns one dict per epoch (train loss, train accuracy, val accuracy when `val` is given).
    `hooks` keep compression constraints (masks, codebooks, fake-quant ranges) in force while training.
    Trains on the device of the model's first parameter (CPU or CUDA); batches may come from the CPU and
    are moved there, and the teacher must already live on that device (a ValueError otherwise).
    """
    if spec.epochs == 0:
        return []
    torch.manual_seed(spec.seed)
    use_kd = teacher is not None and distill is not None
    device = model_device(model)
    if use_kd and model_device(teacher) != device:
        raise ValueError(
            f"the teacher is on {model_device(teacher)} and the student on {device}: move the teacher to the "
            f"student's device (teacher.to({str(device)!r})) before fit()"
        )
    layout = _to_cl if channels_last_safe(model, *([teacher] if use_kd else [])) else (lambda x: x)
    if layout is _to_cl:
        model.to(memory_format=torch.channels_last)
        if use_kd:
            teacher.eval().to(memory_format=torch.channels_last)
    elif use_kd:
        teacher.eval()
    hint = FeatureHint(model, teacher) if use_kd and distill.hint_weight > 0 else None
    attend: AttentionTransfer | None = None  # set up on the first batch (it needs an input)
    decay, no_decay = [], []
    params = list(model.parameters()) + (list(hint.parameters()) if hint else [])
    for p in params:
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if spec.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=(spec.momentum, 0.999))
    else:
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=True)
    steps = spec.epochs * len(train)  # type: ignore[arg-type]
    # OneCycleLR divides by its warm-up length, int(0.2 * steps) - 1: under 10 steps that is 0 or less
    # (ZeroDivisionError), and so short a run has nothing to warm up anyway.
    if spec.schedule == "onecycle" and steps >= 10:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.2)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    hooks = list(hooks or [])
    history = []
    step = 0
    try:
        for epoch in range(spec.epochs):
            model.train()
            seen = 0
            # summed on the device and read once per epoch: no host sync per step (float64: the same
            # sum as adding Python floats)
            total_loss = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            it = wrap_epoch(train, epoch) if wrap_epoch else train
            for x, y in it:
                for h in hooks:
                    h.before_step(step, steps)
                x = layout(x.to(device, non_blocking=True))
                y = y.to(device, non_blocking=True)
                if use_kd and distill.attention_weight > 0 and attend is None:
                    attend = AttentionTransfer(model, teacher, x)
                out = model(x)
                if use_kd:
                    with torch.no_grad():
                        t_out = teacher(x)
                    alpha = distill.alpha * (1.0 - step / steps) if distill.alpha_decay else None
                    loss = kd_loss(out, t_out, y, distill, spec.label_smoothing, alpha)
                    if hint is not None:
                        loss = loss + distill.hint_weight * hint.loss()
                    if attend is not None:
                        loss = loss + distill.attention_weight * attend.loss()
                else:
                    loss = F.cross_entropy(out, y, label_smoothing=spec.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = opt.param_groups[0]["lr"]  # this step's, before the schedule moves it
                opt.step()
                sched.step()
                for h in hooks:
                    h.after_step(step, steps, lr)
                step += 1
                seen += len(y)
                total_loss += loss.detach().double() * len(y)
                correct += (out.argmax(1) == y).sum()
            row = {"epoch": epoch + 1, "train_loss": float(total_loss) / seen,
                   "train_accuracy": 100.0 * int(correct) / seen}
            if val is not None:
                row["val_accuracy"] = evaluate(model, val)["accuracy"]
            history.append(row)
            if on_epoch:
                on_epoch(epoch + 1, row)
    finally:  # also when a hook or on_epoch stops training (a pruned search trial): leave no hook behind
        if hint is not None:
            hint.remove()
        if attend is not None:
            attend.remove()
        model.to(memory_format=torch.contiguous_format)
        if use_kd:
            teacher.to(memory_format=torch.contiguous_format)
        model.eval()
    return history
