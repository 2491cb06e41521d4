"""The search space, derived from the model and the pipeline's plan, and the plan a point of it means.

Each op in `compression.plan` contributes the parameters it has not fixed itself (a field written in
the plan entry pins that op's parameters); `search.space` in pipelines.yaml pins or narrows any
parameter by name. A point (a dict of parameter values) becomes a list of op configs plus the
fine-tune settings, the same JSON the stages apply.

Parameters:
    prune.scale.<group root>  per-layer multiplier of the pruning ratio (prune_shape: per_layer)
    prune.shape_power         exponent over the sensitivity scan (prune_shape: sensitivity)
    prune.ratio               the uniform ratio, when no speedup goal solves it (and always for a
                              multi-objective search, which traces accuracy against cost)
    sparsity                  fraction of weights zeroed (sparsify)
    bits.<layer>              per-layer weight bits of quantization-aware training (qat)
    kmeans.bits               codebook bits (kmeans)
    lowrank.energy            kept singular-value energy (low_rank)
    int8.calibration          activation range rule of post-training int8 (quantize_int8)
    distill.temperature, distill.alpha, finetune.lr
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from compression_ops import Distill, OpConfig, config_from_dict
from compression_ops.base import OpConfigError
from tasks.config import PipelineConfig
from tasks.errors import ConfigError
from tasks.plan import PRUNE_AMOUNT

QAT_BITS = [2, 3, 4, 5, 6, 8]


# `regularize: search` in a channel_prune entry lets the search choose among these (none: cut as it is);
# `steps: search` between one cut and two (iterative); `global_ranking: search` between the searched
# per-group shape and Torch-Pruning's global ranking (per-layer cap max_layer_ratio).
SEARCHED = "search"
REGULARIZE_CHOICES = ["none", "grow", "group_lasso"]
STEPS_CHOICES = [1, 2]


@dataclasses.dataclass
class Param:
    """One dimension: float/int in [low, high] (log-uniform if log), or one of choices; pinned if fixed."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None
    default: Any = None
    fixed: Any = None
    is_fixed: bool = False

    def suggest(self, trial) -> Any:
        if self.is_fixed:
            return self.fixed
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, int | float) and self.low <= value <= self.high

    def clip(self, value: Any) -> Any:
        """The nearest value the dimension holds (a warm start from another space), or the default."""
        if self.kind == "categorical":
            return value if value in self.choices else self.default
        v = min(max(float(value), self.low), self.high)
        return int(round(v)) if self.kind == "int" else v

    def describe(self) -> str:
        if self.is_fixed:
            return f"{self.name} = {self.fixed!r} (pinned)"
        if self.kind == "categorical":
            return f"{self.name} in {self.choices}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


def _sensitivity_by_layer(sensitivity: dict[str, Any] | None) -> dict[str, float]:
    """Mean accuracy drop per layer over the pruning scan's ratios, scaled to [0, 1]."""
    if not sensitivity:
        return {}
    scan = next((s for s in sensitivity.get("scans", []) if s.get("kind") == "channel_prune"), None)
    if not scan:
        return {}
    drops: dict[str, list[float]] = {}
    for r in scan["rows"]:
        drops.setdefault(r["layer"], []).append(max(r["drop"], 0.0))
    mean = {k: sum(v) / len(v) for k, v in drops.items()}
    top = max(mean.values(), default=0.0) or 1.0
    return {k: v / top for k, v in mean.items()}


class SearchSpace:
    """Parameters of one pipeline's search and the mapping from a point to its plan."""

    def __init__(self, cfg: PipelineConfig, model: nn.Module, example, sensitivity: dict[str, Any] | None = None):
        from compression_ops.channel_prune import prune_groups

        self.cfg = cfg
        self.multi_objective = cfg.search.sampler in ("nsga2", "motpe")
        self.entries = [dict(e) for e in cfg.compression.plan]
        self.params: dict[str, Param] = {}
        self.groups = prune_groups(model, example) if any(e["op"] == "channel_prune" for e in self.entries) else []
        self.sensitivity = _sensitivity_by_layer(sensitivity)
        self.layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        goal = cfg.goal
        for i, e in enumerate(self.entries):
            op = e["op"]
            if op == "channel_prune" and e.get("regularize") == SEARCHED:
                # whether (and how) to make the net ready before the cut: each choice costs its trial
                # regularize_epochs of training, counted in the trial's budget
                self._add(Param("prune.regularize", "categorical", choices=REGULARIZE_CHOICES, default="none"))
            if op == "channel_prune" and e.get("steps") == SEARCHED:
                if goal.speedup is None or goal.metric != "macs" or any(e.get(k) is not None for k in PRUNE_AMOUNT):
                    raise ConfigError(
                        f"pipeline {cfg.name!r}: compression.plan[{i}] (channel_prune) has steps: search, but "
                        "iterative pruning cuts towards a MACs target: set goal.speedup with goal.metric: macs "
                        "(and no ratio in the entry), or a fixed steps: 1")
                self._add(Param("prune.steps", "categorical", choices=STEPS_CHOICES, default=1))
            if op == "channel_prune" and e.get("global_ranking") == SEARCHED:
                if e.get("layer_scale") or e.get("per_layer"):
                    raise ConfigError(
                        f"pipeline {cfg.name!r}: compression.plan[{i}] (channel_prune) has global_ranking: search "
                        "and a fixed layer_scale / per_layer: global ranking sets the shape itself; drop one")
                self._add(Param("prune.global", "categorical", choices=[False, True], default=False))
            if op == "channel_prune" and not any(e.get(k) is not None for k in PRUNE_AMOUNT):
                if goal.speedup is None or self.multi_objective:
                    if not (self.multi_objective or goal.size_mb or goal.latency_ms):
                        raise ConfigError(
                            f"pipeline {cfg.name!r}: compression.plan[{i}] (channel_prune) prunes by how much? "
                            "The search maximises accuracy, so with no cost goal it would prune nothing: set "
                            "goal.speedup, goal.size_mb or goal.latency_ms, or search.sampler: nsga2 for a Pareto front"
                        )
                    self._add(Param("prune.ratio", "float", 0.05, 0.85, default=0.5))
                if e.get("layer_scale"):
                    pass  # the user's shape, pinned: only the total is solved or searched
                elif cfg.search.prune_shape == "sensitivity":
                    if not cfg.compression.sensitivity.enabled:
                        raise ConfigError(
                            f"pipeline {cfg.name!r}: search.prune_shape: sensitivity needs the scan: set "
                            "compression.sensitivity.enabled: true, or prune_shape: per_layer"
                        )
                    self._add(Param("prune.shape_power", "float", 0.0, 3.0, default=1.0))
                else:
                    for g in self.groups:
                        self._add(Param(f"prune.scale.{g[0]}", "float", 0.25, 2.0, log=True, default=1.0))
            elif op == "sparsify" and "sparsity" not in e and "pattern" not in e:
                self._add(Param("sparsity", "float", 0.3, 0.95, default=0.5))
            elif op == "qat" and "bits" not in e and "per_layer_bits" not in e:
                for layer in self.layers:
                    self._add(Param(f"bits.{layer}", "categorical", choices=QAT_BITS, default=8))
            elif op == "kmeans" and "bits" not in e and "per_layer_bits" not in e:
                self._add(Param("kmeans.bits", "int", 2, 8, default=4))
            elif op == "low_rank" and "energy" not in e and "rank_ratio" not in e:
                self._add(Param("lowrank.energy", "float", 0.5, 0.99, default=0.9))
            elif op == "quantize_int8" and "calibration" not in e:
                self._add(Param("int8.calibration", "categorical", choices=["minmax", "percentile", "mse"],
                                default="percentile"))
            elif op not in ("channel_prune", "sparsify", "qat", "kmeans", "low_rank", "quantize_int8"):
                try:  # an op the search does not tune: applied as written, checked now
                    config_from_dict(e)
                except (OpConfigError, TypeError) as err:
                    raise ConfigError(f"pipeline {cfg.name!r}: compression.plan[{i}] is invalid: {err}") from err
        d = cfg.finetune.distill
        if d.enabled:
            self._add(Param("distill.temperature", "float", 1.0, 8.0, default=d.temperature))
            self._add(Param("distill.alpha", "float", 0.3, 0.95, default=d.alpha))
        self._add(Param("finetune.lr", "float", 0.003, 0.1, log=True, default=min(max(cfg.finetune.lr, 0.003), 0.1)))
        self._check_entries()
        self._apply_overrides(cfg.search.space)

    def _check_entries(self) -> None:
        """Each plan entry, with this space's defaults filled in, must be a valid op config."""
        point = self.defaults()
        for i, e in enumerate(self.entries):
            if e["op"] == "distill":
                raise ConfigError(f"pipeline {self.cfg.name!r}: compression.plan[{i}]: distill is configured "
                                  "under finetune.distill, not in the plan")
            try:
                self._build_entry(dict(e), point)
            except (OpConfigError, TypeError, ValueError, KeyError) as err:
                raise ConfigError(f"pipeline {self.cfg.name!r}: compression.plan[{i}] is invalid: {err}") from err

    def _add(self, p: Param) -> None:
        self.params[p.name] = p

    def _apply_overrides(self, overrides: dict[str, Any]) -> None:
        where = f"pipeline {self.cfg.name!r}: search.space"
        for name, v in overrides.items():
            p = self.params.get(name)
            if p is None:
                known = ", ".join(self.params) or "(none: the plan fixes everything)"
                raise ConfigError(f"{where}.{name}: no such parameter in this search; parameters: {known}")
            if isinstance(v, dict):
                if set(v) != {"choices"} or not isinstance(v["choices"], list) or not v["choices"]:
                    raise ConfigError(f"{where}.{name}: a mapping must be {{choices: [a, b, ...]}}, got {v!r}")
                p.kind, p.choices, p.low, p.high, p.log = "categorical", list(v["choices"]), None, None, False
                p.default = p.default if p.default in p.choices else p.choices[0]
            elif isinstance(v, list):
                ok = len(v) == 2 and all(isinstance(x, int | float) for x in v) and v[0] < v[1]
                if not ok or p.kind == "categorical":
                    raise ConfigError(
                        f"{where}.{name}: a range is [low, high] with low < high, for a numeric parameter; got {v!r}"
                        + (f" (this one takes one of {p.choices}: use {{choices: [...]}})" if p.kind == "categorical" else "")
                    )
                if p.log and v[0] <= 0:
                    raise ConfigError(f"{where}.{name}: {name} is searched on a log scale, its low end must be > 0")
                p.low, p.high = float(v[0]), float(v[1])
                p.default = p.clip(p.default)
            else:
                p.fixed, p.is_fixed = v, True
        # pinned values, and both ends of every range, must still make valid op configs
        points = [self.defaults()]
        for p in self.searched:
            if p.kind != "categorical" and overrides.get(p.name) is not None:
                points += [self.defaults() | {p.name: p.low}, self.defaults() | {p.name: p.high}]
        for point in points:
            try:
                self.build(point)
            except (OpConfigError, TypeError, ValueError) as err:
                raise ConfigError(f"{where}: the pinned values or ranges make an invalid plan: {err}") from err

    # --- points ---------------------------------------------------------------------------------

    @property
    def searched(self) -> list[Param]:
        return [p for p in self.params.values() if not p.is_fixed]

    def suggest(self, trial) -> dict[str, Any]:
        return {name: p.suggest(trial) for name, p in self.params.items()}

    def defaults(self) -> dict[str, Any]:
        return {name: p.fixed if p.is_fixed else p.default for name, p in self.params.items()}

    def sensitivity_shaped(self) -> dict[str, Any] | None:
        """The warm start from the scan: less sensitive groups pruned harder (None without a scan)."""
        if not self.sensitivity or not self.groups:
            return None
        point = self.defaults()
        if "prune.shape_power" in self.params:
            return point
        scales = self._shape(1.0)
        for root, s in scales.items():
            p = self.params.get(f"prune.scale.{root}")
            if p is not None and not p.is_fixed:
                point[p.name] = p.clip(s)
        return point

    def restrict(self, point: dict[str, Any]) -> dict[str, Any]:
        """`point` (e.g. the previous run's best) fitted to this space: known names, values clipped."""
        out = self.defaults()
        for name, p in self.params.items():
            if name in point and not p.is_fixed:
                out[name] = p.clip(point[name])
        return out

    def _shape(self, power: float) -> dict[str, float]:
        """Per-group multipliers (1 - sensitivity / 2)^power, normalised to mean 1: at power 1 the most
        sensitive group loses half the ratio of the least. (A steeper rule, 1.1 - s, starved the
        insensitive groups at 5x and scored 51 % against 81-87 % for random shapes in bench/search.py.)"""
        raw = {}
        for g in self.groups:
            s = max((self.sensitivity.get(layer, 0.0) for layer in g), default=0.0)
            raw[g[0]] = (1.0 - 0.5 * s) ** power
        mean = sum(raw.values()) / max(len(raw), 1)
        return {k: v / mean for k, v in raw.items()}

    def _build_entry(self, e: dict[str, Any], point: dict[str, Any]) -> OpConfig:
        goal = self.cfg.goal
        op = e["op"]
        if op == "channel_prune" and e.get("regularize") == SEARCHED:
            choice = point.get("prune.regularize", "none")
            e["regularize"] = None if choice == "none" else choice
        if op == "channel_prune" and e.get("steps") == SEARCHED:
            e["steps"] = int(point.get("prune.steps", 1))
        if op == "channel_prune" and e.get("global_ranking") == SEARCHED:
            e["global_ranking"] = bool(point.get("prune.global", False))
        if op == "channel_prune" and not any(e.get(k) is not None for k in PRUNE_AMOUNT):
            if e.get("global_ranking") is True:
                pass  # the ranking across layers gives the shape: no per-group scales
            elif "prune.shape_power" in point:
                e["layer_scale"] = {k: round(v, 4) for k, v in self._shape(float(point["prune.shape_power"])).items()}
            elif not e.get("layer_scale"):
                e["layer_scale"] = {g[0]: round(float(point[f"prune.scale.{g[0]}"]), 4) for g in self.groups}
            if "prune.ratio" in point:
                e["ratio"] = float(point["prune.ratio"])
            elif goal.metric == "latency":
                e["target_latency_reduction"] = goal.speedup
            else:
                e["target_macs_reduction"] = goal.speedup
        elif op == "sparsify" and "sparsity" in point:
            e["sparsity"] = float(point["sparsity"])
        elif op == "qat" and any(k.startswith("bits.") for k in point):
            e["per_layer_bits"] = {k[5:]: int(v) for k, v in point.items() if k.startswith("bits.")}
            e["bits"] = max(e["per_layer_bits"].values())
        elif op == "kmeans" and "kmeans.bits" in point:
            e["bits"] = int(point["kmeans.bits"])
        elif op == "low_rank" and "lowrank.energy" in point:
            e["energy"] = float(point["lowrank.energy"])
        elif op == "quantize_int8" and "int8.calibration" in point:
            e["calibration"] = point["int8.calibration"]
        return config_from_dict(e)

    def build(self, point: dict[str, Any]) -> tuple[list[OpConfig], dict[str, Any]]:
        """The plan (op configs, distillation last) and the fine-tune settings of a point."""
        plan: list[OpConfig] = [self._build_entry(dict(e), point) for e in self.entries]
        d = self.cfg.finetune.distill
        if d.enabled:
            plan.append(Distill(temperature=float(point.get("distill.temperature", d.temperature)),
                                alpha=float(point.get("distill.alpha", d.alpha)), hint_weight=d.hint_weight,
                                attention_weight=d.attention_weight, alpha_decay=d.alpha_decay))
        lr = float(point.get("finetune.lr", self.cfg.finetune.lr))
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"finetune.lr={lr}: must be > 0")
        return plan, {"lr": lr}
