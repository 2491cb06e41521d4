"""The one verb: `apply(model, config, data)`. A config is a validated dataclass; a plan is a list of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
# Every config class by its op name (for plans in JSON); filled by OpConfig.__init_subclass__.
_CONFIGS: dict[str, type] = {}


class OpConfigError(ValueError):
    """A compression config with a value out of range; the message names the field and the range."""


@dataclasses.dataclass
class OpConfig:
    """Base of every op config: validates on construction and round-trips through JSON."""

    op: ClassVar[str] = ""
    # When a pipeline applies the op: "structure" (before fine-tuning, may change shapes; saved in the
    # checkpoint), "train" (right before fine-tuning; its constraint is kept during it by the hooks the
    # op returns), "post" (after fine-tuning, e.g. post-training quantization), or "finetune" (configures
    # the fine-tune loop itself, e.g. distillation; not applied with apply()).
    phase: ClassVar[str] = "structure"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.op:
            _CONFIGS[cls.op] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by ops with constraints
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **dataclasses.asdict(self)}


class TrainHook:
    """Keeps an op's constraint during fine-tuning; `fit(..., hooks=[...])` calls these around each step.

    `before_step` runs before the forward pass (e.g. raise sparsity on a schedule); `after_step` runs
    after the optimizer step (e.g. re-apply masks, re-tie codebook weights, a proximal step), with the
    learning rate that step used (None when the caller has none). `step` counts from 0.
    """

    def before_step(self, step: int, total_steps: int) -> None:
        pass

    def after_step(self, step: int, total_steps: int, lr: float | None = None) -> None:
        pass

    def finish(self) -> dict[str, Any]:
        """Called once after training; returns figures for the op's report."""
        return {}


@dataclasses.dataclass
class OpResult:
    """What an op did: the new model, a small JSON-able report, and hooks for fine-tuning under it."""

    model: nn.Module
    report: dict[str, Any]
    hooks: list[TrainHook] = dataclasses.field(default_factory=list)


OpFn = Callable[[nn.Module, Any, Any], OpResult]
_OPS: dict[str, OpFn] = {}


def register_op(config_cls: type[OpConfig]) -> Callable[[OpFn], OpFn]:
    """Decorator binding a config class to the function that applies it."""

    def deco(fn: OpFn) -> OpFn:
        _OPS[config_cls.op] = fn
        return fn

    return deco


def registered_configs() -> dict[str, type[OpConfig]]:
    """Every op config class by op name (what a plan may name); a copy."""
    return dict(_CONFIGS)


def apply(model: nn.Module, config: OpConfig, data: Any = None) -> OpResult:
    """Apply one compression op; `data` is whatever the op needs (example input, calibration batches)."""
    if config.op not in _OPS:
        raise OpConfigError(_no_handler(config))
    return _OPS[config.op](model, config, data)


def _no_handler(config: OpConfig) -> str:
    """Why apply() cannot run `config`: a fine-tune-phase op, or an op whose handler was never registered."""
    name = type(config).__name__
    if config.phase == "finetune":
        return (
            f"{name} ({config.op!r}) is not applied with apply(): the fine-tune phase applies it "
            "(pass it to fit(..., teacher=..., distill=...), as the finetune stage does)"
        )
    return (
        f"{name} ({config.op!r}) has no registered handler: decorate the function that applies it "
        f"with @register_op({name}) and import its module in compression_ops/__init__.py"
    )


def to_plain(model: nn.Module) -> nn.Module:
    """Replace every training-time wrapper (a module with a `to_plain()` method, e.g. fake-quant) by the
    plain module it stands for, with its compressed weights baked in; in place, returns the model."""
    for name, child in list(model.named_children()):
        if hasattr(child, "to_plain"):
            setattr(model, name, child.to_plain())
        else:
            to_plain(child)
    return model


def forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks: dict[nn.Module, Callable]) -> None:
    """One eval-mode, no-grad forward pass of `example` with a forward hook on each given module; the
    hooks are removed and the training mode restored afterwards, whatever happens."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of an op report (what goes to MLflow metrics and one-line summaries)."""
    return {k: float(v) for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def config_from_dict(d: dict[str, Any]) -> OpConfig:
    """Rebuild a config from its JSON form ({"op": name, ...fields})."""
    d = dict(d)
    name = d.pop("op", None)
    if name not in _CONFIGS:
        raise OpConfigError(f"unknown op {name!r}; known: {', '.join(sorted(_CONFIGS))}")
    cls = _CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise OpConfigError(f"op {name!r} has no field(s) {sorted(unknown)}; fields: {sorted(fields)}")
    return cls(**d)


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise OpConfigError(f"{name}={value!r} is out of range: expected a value in {lb}{lo}, {hi}{rb}")


@dataclasses.dataclass
class OpData:
    """What ops may need besides the model: an example input and a few labelled batches."""

    example: torch.Tensor
    batches: Batches | None = None
    max_batches: int = 8

    def limited(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.batches is None:
            return []
        out = []
        for i, b in enumerate(self.batches):
            if i >= self.max_batches:
                break
            out.append(b)
        return out


def _outputs(model: nn.Module, example: torch.Tensor) -> list[Any]:
    """The leaves of one eval-mode, no-grad forward pass of `example`; the training mode is restored."""
    from torch.utils._pytree import tree_leaves

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        model.train(was_training)
    return tree_leaves(out)


def check_outputs(before: nn.Module, after: nn.Module, example: torch.Tensor) -> str | None:
    """Why `after` (a model an op returned) is broken where `before` was not, or None when it is fine.

    Broken means: its forward pass on `example` raises, returns another structure, shapes or dtypes,
    or non-finite values where `before` gave finite ones. The values themselves may differ (that is
    what compression does)."""
    ref = _outputs(before, example)
    try:
        got = _outputs(after, example)
    except Exception as e:  # any failure of the forward pass is the finding, not an error of the check
        return f"its model's forward pass raises {type(e).__name__}: {_first_line(e)}"
    if len(got) != len(ref):
        return f"its model returns {len(got)} output(s) instead of {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        what = "output" if len(ref) == 1 else f"output {i}"
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor):
            return f"its model's {what} is a {type(g).__name__}, not a tensor"
        if g.shape != r.shape:
            return f"its model's {what} has shape {tuple(g.shape)} instead of {tuple(r.shape)}"
        if g.dtype != r.dtype:
            return f"its model's {what} has dtype {g.dtype} instead of {r.dtype}"
        if g.is_floating_point() and bool(torch.isfinite(r).all()) and not bool(torch.isfinite(g).all()):
            return f"its model's {what} has NaN or infinite values (the model before it had none)"
    return None


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exception_gist(e: BaseException) -> str:
    """One line naming an exception and where it was raised: `Type: first line of message (at file.py:123 in fn)`."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    last = frames[-1] if frames else None  # where it broke: often the model's own forward, naming the layer
    where = f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})" if last else ""
    return f"{type(e).__name__}: {_first_line(e)}{where}"


def param_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module holding parameters of its own (Conv, Linear, norms, embeddings, a block's own
    layer-scale or class token), by name; the root model counts as "" when it holds any."""
    return {n: m for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
