"""Turn a pipeline's goal and compression plan into op configs, validated.

Plans from pipelines.yaml and (issue 4) from the search end in the same JSON that the stages apply.
"""

from __future__ import annotations

from typing import Any

from compression_ops import Distill, OpConfig, OpData, apply, config_from_dict
from compression_ops.base import OpConfigError, TrainHook, check_outputs, exception_gist, report_scalars
from tasks.config import PipelineConfig
from tasks.errors import ConfigError
from tasks.progress import say

# plan.json's format: 2 is {"format": 2, "ops": [...]}; 1 (a bare list of op configs) is still read.
PLAN_FORMAT = 2
KNOWN_PLAN_FORMATS = (1, 2)
# Fields of channel_prune that fix how much is pruned; without one, the goal decides.
PRUNE_AMOUNT = ("ratio", "per_layer", "target_macs_reduction", "target_latency_reduction")


def plan_from_config(cfg: PipelineConfig) -> list[OpConfig]:
    """The pipeline's plan: its ops in order, then distillation (configured under finetune)."""
    goal = cfg.goal
    plan: list[OpConfig] = []
    for i, item in enumerate(cfg.compression.plan):
        item = dict(item)
        if item["op"] == "channel_prune" and not any(item.get(k) is not None for k in PRUNE_AMOUNT):
            if goal.speedup is None and goal.frontier:
                raise ConfigError(
                    f"pipeline {cfg.name!r} has goal.frontier {goal.frontier}: each point's speedup is set by its "
                    "own point run, which its DAG (shrinkflow run) starts: run the whole pipeline. For a single stage at one "
                    "speedup (dvc repro, shrinkflow stage), declare a pipeline with goal.speedup."
                )
            if goal.speedup is None:
                raise ConfigError(
                    f"pipeline {cfg.name!r}: compression.plan[{i}] (channel_prune) prunes by how much? "
                    "Set goal.speedup or a ratio in the plan entry."
                )
            key = "target_latency_reduction" if goal.metric == "latency" else "target_macs_reduction"
            item[key] = goal.speedup
        for key, fix in (("regularize", "name a method (grow, group_lasso, bn_l1) or null"),
                         ("steps", "give a number (1: one cut)"), ("global_ranking", "give true or false")):
            if item["op"] == "channel_prune" and item.get(key) == "search":
                raise ConfigError(
                    f"pipeline {cfg.name!r}: compression.plan[{i}] (channel_prune) has {key}: search, but there is "
                    f"no search (search.n_trials: 0): {fix}, or set search.n_trials")
        try:
            op = config_from_dict(item)
        except (OpConfigError, TypeError) as e:
            raise ConfigError(f"pipeline {cfg.name!r}: compression.plan[{i}] is invalid: {e}") from e
        if op.phase == "finetune":
            raise ConfigError(
                f"pipeline {cfg.name!r}: compression.plan[{i}]: {op.op} is configured under finetune.distill, "
                "not in the plan"
            )
        plan.append(op)
    d = cfg.finetune.distill
    if d.enabled:
        plan.append(Distill(temperature=d.temperature, alpha=d.alpha, hint_weight=d.hint_weight,
                            attention_weight=d.attention_weight, alpha_decay=d.alpha_decay))
    return plan


def ops_in_phase(plan: list[OpConfig], phase: str) -> list[OpConfig]:
    return [op for op in plan if op.phase == phase]


def apply_ops(
    cfg: PipelineConfig, model: Any, ops: list[OpConfig], data: OpData, *, quiet: bool = False
) -> tuple[Any, list[TrainHook], list[dict]]:
    """Apply ops in order; returns the model, the hooks fine-tuning must call, and each op's report.

    An op that fails from inside (any exception but OpConfigError, which is the user's config) or returns
    a model whose output on data.example is broken (another shape, NaN) is reverted: the plan goes on
    with the model from before it, its report says `reverted: why` and holds no applied layer, and one
    line says so even when quiet (a skipped op is news in a search trial too).
    quiet: no line per op that worked (search trials apply a plan many times)."""
    hooks: list[TrainHook] = []
    reports: list[dict] = []
    for op in ops:
        try:
            res = apply(model, op, data)
            why = check_outputs(model, res.model, data.example)
        except OpConfigError as e:
            raise ConfigError(f"pipeline {cfg.name!r}: {op.op} cannot run: {e}") from e
        except Exception as e:  # a bug or an unsupported layer inside the op: the plan goes on without it
            why = f"it raised {exception_gist(e)}"
        if why is not None:
            # apply() never changes its input (tests/compression_ops/test_op_contract.py), so the model
            # from before the op is the revert
            reports.append({"op": op.op, "applied": [], "skipped": {}, "reverted": why})
            say(f"{op.op}: skipped (model left as before it): {why}")
            continue
        model, hooks, reports = res.model, hooks + res.hooks, reports + [res.report]
        if not quiet:
            say(f"{op.op}: {', '.join(f'{k}={v:.4g}' for k, v in report_scalars(res.report).items())}")
    return model, hooks, reports


def plan_to_json(plan: list[OpConfig]) -> dict[str, Any]:
    """The plan as plan.json holds it: {"format": PLAN_FORMAT, "ops": [each op's config]}."""
    return {"format": PLAN_FORMAT, "ops": [p.to_dict() for p in plan]}


def plan_from_json(doc: dict[str, Any] | list[dict[str, Any]]) -> list[OpConfig]:
    """The op configs of a plan.json document: the current {"format": ..., "ops": [...]}, or a bare list
    of op configs (format 1, written before plans carried a version)."""
    return [config_from_dict(d) for d in _ops_json(doc)]


def plan_format(doc: Any) -> int:
    """The format version of a plan.json document; a bare list is format 1."""
    if isinstance(doc, list):
        return 1
    if not (isinstance(doc, dict) and "format" in doc and isinstance(doc.get("ops"), list)):
        raise ConfigError(
            f"a plan must be {{\"format\": {PLAN_FORMAT}, \"ops\": [...]}} (or a list of op configs), not "
            f"{str(doc)[:80]}: write plan.json with tasks.plan.plan_to_json"
        )
    return doc["format"]


def _ops_json(doc: Any) -> list[dict[str, Any]]:
    """The op configs' JSON entries of a plan.json document of any known format."""
    version = plan_format(doc)
    if version not in KNOWN_PLAN_FORMATS:
        raise ConfigError(
            f"plan format {version!r} is not one this shrinkflow reads (formats "
            f"{', '.join(map(str, KNOWN_PLAN_FORMATS))}; a newer shrinkflow wrote it?): upgrade shrinkflow, "
            "or re-run the search stage with this version to rewrite plan.json"
        )
    return doc if isinstance(doc, list) else doc["ops"]
