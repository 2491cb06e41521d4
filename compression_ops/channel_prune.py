"""Dependency-aware channel pruning, wrapping Torch-Pruning's dependency graph.

Torch-Pruning keeps residual adds, concatenations and depthwise groups consistent; we choose the
importance criterion, the per-layer ratios, and solve for the ratio that meets a MACs or latency target.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compression_ops import attention, prune_plan
from compression_ops.base import OpConfig, OpConfigError, OpData, OpResult, check_range, register_op
from compression_ops.metrics import count_macs, count_params


@contextlib.contextmanager
def quiet_unwrapped() -> Iterator[None]:
    """Silences Torch-Pruning's warning about parameters held outside a layer (class tokens, position
    embeddings, layer scale): it prunes them along their channel dimension, which is what these are."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        yield


def _torch_pruning(cls_name: str, **kwargs: Any) -> Callable[[], Any]:
    """A factory of Torch-Pruning's importance class `cls_name` (Torch-Pruning is imported when called)."""

    def make() -> Any:
        import torch_pruning as tp

        return getattr(tp.importance, cls_name)(**kwargs)

    return make


def _dcp() -> Any:
    from compression_ops.dcp import DCPImportance

    return DCPImportance()


# Importance criterion name -> factory of the object that ranks channels (Torch-Pruning's protocol).
# A criterion added here is valid in ChannelPrune(importance=...) and in pipelines.yaml at once.
IMPORTANCES: dict[str, Callable[[], Any]] = {
    "l1": _torch_pruning("GroupMagnitudeImportance", p=1),
    "l2": _torch_pruning("GroupMagnitudeImportance", p=2),
    "bn_scale": _torch_pruning("BNScaleImportance"),
    "taylor": _torch_pruning("GroupTaylorImportance"),
    "dcp": _dcp,
}
# Importance criteria computed from gradients on labelled batches.
NEEDS_BATCHES = ("taylor", "dcp")


def check_importance(name: str) -> None:
    """Raise OpConfigError, listing the known criteria, unless `name` is one of IMPORTANCES."""
    if not isinstance(name, str) or name not in IMPORTANCES:
        raise OpConfigError(f"importance={name!r}: expected one of {', '.join(sorted(IMPORTANCES))}")


def importance_for(name: str) -> Any:
    """A fresh importance object for the criterion `name`."""
    check_importance(name)
    return IMPORTANCES[name]()


@dataclasses.dataclass
class ChannelPrune(OpConfig):
    """Remove a fraction of output channels per prunable layer.

    ratio: fraction removed from every layer (ignored where per_layer names the layer).
    importance: l1 / l2 (weight magnitude), bn_scale, taylor (gradient x weight) or dcp
        (discrimination-aware, see compression_ops.dcp); taylor and dcp need OpData.batches.
    target_macs_reduction: if set, solve the uniform ratio so MACs fall by this factor (e.g. 2.0).
    target_latency_reduction: if set, solve the uniform ratio so PyTorch eager latency at the example's
        batch size falls by this factor, measured here (median of latency_repeat runs); noisy, so the
        report gives the factor measured on the result. At most one target may be set.
    reconstruct: after the cut, re-fit each layer whose inputs lost channels so its outputs on calibration
        batches match the unpruned layer's (compression_ops.reconstruct; needs OpData.batches). Off by
        default: it keeps far more accuracy right after the cut, but after a 3-epoch KD fine-tune it was
        level at 5x and 4 pt behind at 9x (bench/cut.py), so it is not yet what the default plan uses.
    reconstruct_batches: calibration batches for it.
    regularize: make the net ready to be cut first (compression_ops.regularize): "grow" (decay only the
        channels the cut will remove, growing), "group_lasso" (group-norm proximal steps on every channel
        group) or "bn_l1" (network slimming); None cuts the net as it is. Trains regularize_epochs
        epochs over OpData.batches, distilling from the unpruned net, SGD at regularize_lr (cosine).
    regularize_strength: for grow, how far the removed channels fade (their weights end x e^-strength);
        for group_lasso / bn_l1 the penalty weight; None takes compression_ops.regularize.DEFAULT_STRENGTH.
    steps: cut in this many steps (iterative pruning; needs target_macs_reduction): step i reaches
        target^(i/steps) of the MACs reduction, and between steps the net is fine-tuned for step_epochs
        epochs over OpData.batches at step_lr (SGD, cosine), distilling from the unpruned net. regularize
        and reconstruct then apply at every step; the report's pruning_history is the last step's.
    global_ranking: rank channels across all layers at once (Torch-Pruning's global pruning) instead of
        removing the same fraction from each: the ratio is then the fraction of all channels removed, and
        a MACs or latency target is solved with the configured importance (which channels go now
        changes the cost). max_layer_ratio caps what any one layer loses.
    layer_scale: per-layer multipliers of the (solved) ratio: layer n loses ratio * layer_scale[n] of its
        channels (capped so one channel stays). With a target this shapes the cut: the search samples the
        shape, the bisection finds the scale that meets the target.
    """

    op = "channel_prune"
    ratio: float = 0.5
    importance: str = "l2"
    per_layer: dict[str, float] | None = None
    layer_scale: dict[str, float] | None = None
    target_macs_reduction: float | None = None
    target_latency_reduction: float | None = None
    latency_repeat: int = 20
    round_to: int | None = None
    ignore: list[str] = dataclasses.field(default_factory=list)
    reconstruct: bool = False
    reconstruct_batches: int = 8
    global_ranking: bool = False
    max_layer_ratio: float = 0.9
    regularize: str | None = None
    regularize_epochs: int = 1
    regularize_strength: float | None = None
    regularize_lr: float = 0.01
    steps: int = 1
    step_epochs: int = 1
    step_lr: float = 0.05

    def validate(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, hi_open=True)
        check_importance(self.importance)
        for name, r in (self.per_layer or {}).items():
            check_range(f"per_layer[{name!r}]", r, 0.0, 1.0, hi_open=True)
        for name, r in (self.layer_scale or {}).items():
            check_range(f"layer_scale[{name!r}]", r, 0.0, 100.0)
        both = set(self.per_layer or {}) & set(self.layer_scale or {})
        if both:
            raise OpConfigError(f"layers {sorted(both)} are in both per_layer and layer_scale: keep one")
        if self.target_macs_reduction is not None:
            check_range("target_macs_reduction", self.target_macs_reduction, 1.0, 1e6, lo_open=True)
        if self.target_latency_reduction is not None:
            check_range("target_latency_reduction", self.target_latency_reduction, 1.0, 1e6, lo_open=True)
            if self.target_macs_reduction is not None:
                raise OpConfigError(
                    "target_macs_reduction and target_latency_reduction are both set: keep one of them"
                )
        check_range("latency_repeat", self.latency_repeat, 3, 10_000)
        check_range("reconstruct_batches", self.reconstruct_batches, 1, 10_000)
        check_range("max_layer_ratio", self.max_layer_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("steps", self.steps, 1, 20)
        check_range("step_epochs", self.step_epochs, 0, 1000)
        check_range("step_lr", self.step_lr, 0.0, 10.0, lo_open=True)
        if self.steps > 1 and self.target_macs_reduction is None:
            raise OpConfigError(
                f"steps={self.steps} prunes towards a MACs target in steps: set target_macs_reduction "
                "(or goal.speedup with metric macs), or steps: 1")
        if self.global_ranking and (self.per_layer or self.layer_scale):
            raise OpConfigError("global_ranking ranks every layer together: drop per_layer / layer_scale, or turn it off")
        if self.regularize is not None:
            from compression_ops.regularize import METHODS

            if self.regularize not in METHODS:
                raise OpConfigError(f"regularize={self.regularize!r}: expected one of {', '.join(METHODS)} (or null)")
            check_range("regularize_epochs", self.regularize_epochs, 1, 1000)
            check_range("regularize_lr", self.regularize_lr, 0.0, 10.0, lo_open=True)
            if self.regularize_strength is not None:
                check_range("regularize_strength", self.regularize_strength, 0.0, 100.0, lo_open=True)
        if self.round_to is not None:
            check_range("round_to", self.round_to, 1, 1024)


class OpBrokeModel(RuntimeError):
    """An op's result fails the output check (the example no longer gives finite outputs of the same shape)."""


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose outputs are the logits: pruning them would change the number of classes."""
    with torch.no_grad():
        n_out = model(example).shape[-1]
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_out]


def _width(layer: nn.Module) -> int:
    """Output channels of a conv or linear layer (1 for anything else)."""
    return getattr(layer, "out_channels", None) or getattr(layer, "out_features", None) or 1


def _layer_cap(channels: int, round_to: int | None) -> float:
    """The largest ratio that leaves a layer of `channels` at least one channel (one group of round_to)
    after Torch-Pruning's whole-channel rounding; above it the layer's group would be skipped."""
    keep = round_to or 1
    return max(0.0, min(0.95, 1.0 - (keep + 0.5) / max(channels, 1)))


def _ratio_cap(model: nn.Module, round_to: int | None, skip: list[nn.Module] = ()) -> float:
    """The largest uniform ratio that leaves the narrowest prunable conv or linear layer a channel (a group
    of round_to); `skip`: layers that are not pruned (the classifier). Single-channel layers never are."""
    widths = [
        _width(m) for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and _width(m) > 1 and not any(m is s for s in skip)
    ]
    return _layer_cap(min(widths, default=2), round_to)


@dataclasses.dataclass
class _Planned:
    """A Torch-Pruning pruner set up on a model (importance prepared), and what pruning it needs."""

    pruner: Any
    atts: list
    outputs: list[nn.Module]
    shape: tuple[int, ...]
    single: list[str]
    extra: dict[str, Any]


def _plan(model: nn.Module, cfg: ChannelPrune, ratio: float, data: OpData) -> _Planned:
    """Set up the pruner for `model` at `ratio` (nothing pruned yet)."""
    import torch_pruning as tp

    modules = dict(model.named_modules())
    unknown = [n for n in [*cfg.ignore, *(cfg.per_layer or {}), *(cfg.layer_scale or {})] if n not in modules]
    if unknown:
        raise OpConfigError(f"layer name(s) {unknown} not in the model; names look like {list(modules)[1:4]}")
    was_training = model.training
    with torch.no_grad():
        shape = tuple(model.eval()(data.example).shape)
    model.train(was_training)
    outputs = output_layers(model, data.example)
    ignored = outputs + [modules[n] for n in cfg.ignore]
    cap = _ratio_cap(model, cfg.round_to, outputs)
    uniform = min(ratio, cap) if cfg.layer_scale else ratio
    ratio_dict = {modules[n]: r for n, r in (cfg.per_layer or {}).items()}
    for n, scale in (cfg.layer_scale or {}).items():
        layer = modules[n]
        ratio_dict[layer] = max(0.0, min(ratio * scale, _layer_cap(_width(layer), cfg.round_to)))
    atts = attention.find_attention(model)

    def ratio_of(att: attention.Attention) -> float:
        named = [ratio_dict[m] for m in (att.module, *att.projections) if m in ratio_dict]
        return named[0] if named else uniform

    heads_kw = prune_plan.attention_kwargs(list(modules.values()), atts, ratio_of)
    per_head = [getattr(owner, attr) for a in atts for owner, attr, _ in a.per_head.values()]
    batches = data.limited() if cfg.importance in NEEDS_BATCHES else []
    if cfg.importance in NEEDS_BATCHES and not batches:
        what = "gradient x weight" if cfg.importance == "taylor" else "auxiliary heads and gradients"
        raise OpConfigError(
            f"importance={cfg.importance!r} needs labelled batches ({what}): pass OpData(example=..., batches=...)"
        )
    importance = importance_for(cfg.importance)
    with quiet_unwrapped():
        pruner = tp.pruner.MetaPruner(
            model,
            data.example,
            importance=importance,
            # with layer_scale a solved scale can pass the cap: the layers it does not name stop at the cap
            pruning_ratio=uniform,
            pruning_ratio_dict=ratio_dict or None,
            ignored_layers=ignored + per_head,
            round_to=cfg.round_to,
            global_pruning=cfg.global_ranking,
            **({"max_pruning_ratio": cfg.max_layer_ratio} if cfg.global_ranking else {}),
            **heads_kw,
        )
    extra: dict[str, Any] = {}
    if cfg.importance == "dcp":
        dcp = importance.prepare(model, batches)
        extra = {"dcp_aux_heads": dcp["aux_heads"], "dcp_aux_head_accuracy": dcp["aux_head_accuracy"]}
    elif cfg.importance == "taylor":
        model.zero_grad()
        was_training = model.training
        model.eval()  # BN statistics are not to move while gathering gradients
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
        model.train(was_training)
    single = [a.name for a in atts if a.heads == 1]
    return _Planned(pruner, atts, outputs, shape, single, extra)


def _prune_in_place(model: nn.Module, cfg: ChannelPrune, ratio: float, data: OpData) -> dict[str, Any]:
    """Prune `model` itself; returns the report's entries on what was pruned and skipped (and what the
    importance criterion has to report, e.g. dcp's heads)."""
    planned = _plan(model, cfg, ratio, data)
    pruner, atts, outputs, shape, single, extra = (
        planned.pruner, planned.atts, planned.outputs, planned.shape, planned.single, planned.extra)
    names = {m: n for n, m in model.named_modules()}
    heads0 = sum(a.heads for a in atts)
    applied, skipped = prune_plan.GroupPruner(pruner, model, atts).prune(data.example, shape)
    model.zero_grad(set_to_none=True)
    attention.sync_torch_mha(model)
    skipped.update({names[m]: "its outputs are the classes" for m in outputs})
    skipped.update({n: "named in the config's ignore list" for n in cfg.ignore})
    skipped.update({n: "heads left unpruned: a single head, and one is always kept" for n in single})
    extra.update(applied=applied, skipped=skipped)
    # Which channels went, per group root: replayed by the reconstruction, and the cut's record.
    extra["pruning_history"] = [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in pruner.pruning_history()]
    if atts:
        extra.update(heads_before=heads0, heads_after=sum(a.heads for a in atts))
    problem = prune_plan.output_problem(model, data.example, shape)
    if problem is not None:
        raise OpBrokeModel(f"channel_prune broke the model: {problem} (pruned: {', '.join(applied) or 'nothing'})")
    return extra


def _bisect_ratio(
    model: nn.Module,
    cfg: ChannelPrune,
    data: OpData,
    reduction_of: Callable[[nn.Module], float],
    target: float,
    steps: int,
    what: str,
) -> float:
    """Bisect the smallest uniform ratio whose pruned model has reduction_of(pruned) >= target."""
    # which channels go does not change the cost of a uniform cut; with global ranking it does
    probe_cfg = cfg if cfg.global_ranking else dataclasses.replace(cfg, importance="l2")
    # Torch-Pruning skips a layer whose ratio would leave it no channel, which breaks the bisection's
    # monotonicity at high ratios: cap the ratio so the narrowest layer keeps one channel (one group of
    # round_to channels when rounding).
    lo, hi = 0.0, _ratio_cap(model, cfg.round_to, output_layers(model, data.example))
    scales = [s for s in (cfg.layer_scale or {}).values() if s > 0]
    if scales and min(scales) < 1:
        # Scaled layers are capped one by one: go up until the least-scaled layer reaches its cap too.
        hi = hi / min(scales)

    def reduction_at(ratio: float) -> float:
        m = copy.deepcopy(model)
        _prune_in_place(m, probe_cfg, ratio, data)
        return reduction_of(m)

    at_hi = reduction_at(hi)
    if at_hi < target:
        raise OpConfigError(
            f"a {target}x {what} reduction is out of reach by channel pruning alone "
            f"(even ratio {hi:.4g} gives {at_hi:.2f}x, i.e. leaves {1 / at_hi:.0%} of the {what})"
        )
    for _ in range(steps):
        mid = (lo + hi) / 2
        if reduction_at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return math.ceil(hi * 1e4) / 1e4  # round up: rounding down can fall back below the goal


def solve_ratio(model: nn.Module, cfg: ChannelPrune, data: OpData, target_reduction: float) -> float:
    """Bisect the uniform ratio whose pruned model has base_macs / target_reduction MACs or fewer."""
    base = count_macs(model, data.example)
    return _bisect_ratio(
        model, cfg, data, lambda m: base / max(count_macs(m, data.example), 1), target_reduction, 14, "MACs"
    )


def latency_reduction(base: nn.Module, candidate: nn.Module, x: torch.Tensor, repeat: int = 20, warmup: int = 3) -> tuple[float, float, float]:
    """(base / candidate median latency, base ms, candidate ms): PyTorch eager, inference_mode.

    The two models run interleaved so that load from other processes hits both alike.
    """
    was = base.training, candidate.training
    base.eval()
    candidate.eval()
    tb, tc = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            base(x)
            candidate(x)
        for _ in range(repeat):
            t0 = time.perf_counter()
            base(x)
            t1 = time.perf_counter()
            candidate(x)
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            tc.append(t2 - t1)
    base.train(was[0])
    candidate.train(was[1])
    mb, mc = statistics.median(tb), statistics.median(tc)
    return mb / max(mc, 1e-12), mb * 1e3, mc * 1e3


# Latency is noisy: few bisection steps, each on medians; the result's own factor is measured again.
LATENCY_BISECTION_STEPS = 6


def solve_latency_ratio(model: nn.Module, cfg: ChannelPrune, data: OpData, target_reduction: float) -> float:
    """Bisect the uniform ratio whose pruned model runs target_reduction times faster (eager, measured)."""
    x = data.example

    def reduction_of(m: nn.Module) -> float:
        return latency_reduction(model, m, x, repeat=cfg.latency_repeat)[0]

    return _bisect_ratio(model, cfg, data, reduction_of, target_reduction, LATENCY_BISECTION_STEPS, "latency")


@register_op(ChannelPrune)
def channel_prune(model: nn.Module, cfg: ChannelPrune, data: OpData) -> OpResult:
    """Prune a copy of `model`; the original is left untouched."""
    if not isinstance(data, OpData):
        raise OpConfigError("channel_prune needs OpData(example=<input tensor>, batches=...)")
    if cfg.steps > 1:
        return _iterative(model, cfg, data)
    base = model
    model = copy.deepcopy(model)
    macs0, params0 = count_macs(model, data.example), count_params(model)
    ratio = cfg.ratio
    if cfg.target_macs_reduction is not None:
        ratio = solve_ratio(model, cfg, data, cfg.target_macs_reduction)
    elif cfg.target_latency_reduction is not None:
        ratio = solve_latency_ratio(model, cfg, data, cfg.target_latency_reduction)
    regularized = _regularize(base, model, cfg, ratio, data) if cfg.regularize else None
    extra = _prune_in_place(model, cfg, ratio, data)
    macs1, params1 = count_macs(model, data.example), count_params(model)
    report = {
        "op": cfg.op,
        "ratio": ratio,
        "importance": cfg.importance,
        "macs_before": macs0,
        "macs_after": macs1,
        "macs_reduction": macs0 / max(macs1, 1),
        "params_before": params0,
        "params_after": params1,
        **extra,
        # training spent inside the op, in epochs over OpData.batches (budget accounting)
        "train_epochs": cfg.regularize_epochs if cfg.regularize else 0,
    }
    if regularized is not None:
        report["regularization"] = regularized
    if cfg.reconstruct:
        report["reconstruction"] = _reconstruct(base, model, report["pruning_history"], data, cfg)
    if cfg.target_latency_reduction is not None:
        # 3x the repeats of a bisection probe: this is the figure the report stands on.
        lat, ms0, ms1 = latency_reduction(base, model, data.example, repeat=3 * cfg.latency_repeat)
        report.update({"latency_reduction": lat, "latency_before_ms": ms0, "latency_after_ms": ms1})
    return OpResult(model, report)


def _iterative(base: nn.Module, cfg: ChannelPrune, data: OpData) -> OpResult:
    """cfg.steps cuts, each to target^(i/steps) of the MACs reduction, with step_epochs of distillation from
    `base` between them; the report is the last cut's, with the totals and one summary per step."""
    from compression_ops.distill import Distill
    from compression_ops.finetune import TrainSpec, fit

    if data.batches is None and cfg.step_epochs > 0:
        raise OpConfigError(f"steps={cfg.steps} fine-tunes between cuts: pass OpData(example=..., batches=...)")
    macs0, params0 = count_macs(base, data.example), count_params(base)
    teacher = copy.deepcopy(base).eval()
    current, steps, applied, epochs = base, [], set(), 0
    res, macs1 = None, macs0
    for i in range(1, cfg.steps + 1):
        goal = macs0 / cfg.target_macs_reduction ** (i / cfg.steps)  # MACs after this step
        step_cfg = dataclasses.replace(cfg, steps=1, target_macs_reduction=max(macs1 / goal, 1.0 + 1e-6))
        res = channel_prune(current, step_cfg, data)
        current, macs1 = res.model, res.report["macs_after"]
        applied.update(res.report.get("applied", []))
        epochs += res.report["train_epochs"]
        if i < cfg.steps and cfg.step_epochs > 0:
            fit(current, data.batches, TrainSpec(epochs=cfg.step_epochs, lr=cfg.step_lr, seed=i),
                teacher=teacher, distill=Distill())
            epochs += cfg.step_epochs
        steps.append({"step": i, "ratio": res.report["ratio"], "macs_reduction": macs0 / macs1})
    report = {**res.report, "macs_before": macs0, "macs_after": macs1, "macs_reduction": macs0 / max(macs1, 1),
              "params_before": params0, "params_after": count_params(current), "applied": sorted(applied),
              "train_epochs": epochs, "steps": steps}
    return OpResult(current, report)


def _regularize(base: nn.Module, model: nn.Module, cfg: ChannelPrune, ratio: float, data: OpData) -> dict[str, Any]:
    """Train `model` (a copy of `base`) in place with cfg.regularize's sparsity-inducing regulariser,
    distilling from `base`; the report's summary (channel-group norms before and after)."""
    from compression_ops.distill import Distill
    from compression_ops.finetune import TrainSpec, fit
    from compression_ops.regularize import (
        DEFAULT_STRENGTH,
        Regularizer,
        batchnorms,
        group_norms,
        plan_groups,
        summary,
    )

    if data.batches is None:
        raise OpConfigError(f"regularize={cfg.regularize!r} trains before the cut: pass OpData(example=..., batches=...)")
    planned = _plan(model, cfg, ratio, data)
    model.zero_grad(set_to_none=True)  # taylor's gradients, if any
    groups = plan_groups(planned.pruner, model, all_channels=cfg.regularize == "group_lasso")
    bns = batchnorms(model)
    before = group_norms(groups)
    bn_before = [bn.weight.detach().abs().clone() for bn in bns]
    spec = TrainSpec(epochs=cfg.regularize_epochs, lr=cfg.regularize_lr, schedule="cosine")
    strength = cfg.regularize_strength if cfg.regularize_strength is not None else DEFAULT_STRENGTH[cfg.regularize]
    hook = Regularizer(cfg.regularize, strength, groups, bns)
    teacher = copy.deepcopy(base).eval()  # apply() leaves its input untouched, memory format included
    history = fit(model, data.batches, spec, teacher=teacher, distill=Distill(), hooks=[hook])
    out = {"method": cfg.regularize, "strength": strength, "epochs": cfg.regularize_epochs,
           "train_accuracy_last_epoch": history[-1]["train_accuracy"] if history else None}
    if cfg.regularize == "bn_l1":
        out.update(summary(bn_before, [bn.weight.detach().abs() for bn in bns]))
    else:
        out.update(summary(before, group_norms(groups)))
    return out


def _reconstruct(base: nn.Module, model: nn.Module, history: list, data: OpData, cfg: ChannelPrune) -> dict[str, Any]:
    """Re-fit the layers whose inputs lost channels (compression_ops.reconstruct); the report's summary."""
    from compression_ops.base import exception_gist
    from compression_ops.reconstruct import kept_channels, reconstruct

    images = [b[0] if isinstance(b, tuple | list) else b for b in list(data.batches or [])[: cfg.reconstruct_batches]]
    if not images:
        raise OpConfigError("reconstruct=True needs calibration batches: pass OpData(example=..., batches=...)")
    try:
        kept = kept_channels(base, history, data.example)
        rec = reconstruct(base, model, kept, images)
    except Exception as e:  # a graph the replay cannot follow: the cut stands as it is, and the report says why
        return {"skipped": f"the pruning history could not be replayed: {exception_gist(e)}"}
    rows = rec["layers"]
    refit = [r for r in rows.values() if r["refit"]]
    return {
        "images": rec["images"],
        "layers_refit": len(refit),
        "error_before_mean": sum(r["error_before"] for r in rows.values()) / max(len(rows), 1),
        "error_after_mean": sum(r["error_after"] for r in rows.values()) / max(len(rows), 1),
        "layers": rows,
    }


def prune_groups(model: nn.Module, example: torch.Tensor) -> list[list[str]]:
    """The conv and linear layers channel pruning removes together (residual adds tie them), root first.

    Torch-Pruning reads a group's ratio from its root, so per-group settings (the search's per-layer
    ratios, layer_scale) are keyed by the root's name. An attention group's ratio sets how many heads go.
    """
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    with quiet_unwrapped():
        graph = tp.DependencyGraph().build_dependency(model, example)
    groups = []
    roots = [nn.Conv2d, nn.Linear]
    for g in graph.get_all_groups(ignored_layers=output_layers(model, example), root_module_types=roots):
        root = names[g[0][0].target.module]
        members = {
            names[dep.target.module] for dep, _ in g
            if isinstance(dep.target.module, nn.Conv2d | nn.Linear) and graph.is_out_channel_pruning_fn(dep.handler)
        }
        groups.append([root, *sorted(members - {root})])
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(groups, key=lambda grp: order[grp[0]])
