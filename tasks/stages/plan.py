"""Turn a pipeline's goal and compression settings into a plan: a list of op configs.

Issue 4's search will produce plans too; both paths end in the same JSON that compress/finetune apply.
"""

from __future__ import annotations

from typing import Any

from compression_ops import ChannelPrune, Distill, OpConfig, config_from_dict
from tasks.config import PipelineConfig
from tasks.errors import ConfigError


def plan_from_config(cfg: PipelineConfig) -> list[OpConfig]:
    c, goal = cfg.compression, cfg.goal
    plan: list[OpConfig] = []
    for op in c.ops:
        if op == "channel_prune":
            if c.ratio is not None:
                plan.append(ChannelPrune(ratio=c.ratio, importance=c.importance))
            elif goal.speedup is not None:
                plan.append(ChannelPrune(target_macs_reduction=goal.speedup, importance=c.importance))
            else:
                raise ConfigError(
                    f"pipeline {cfg.name!r}: channel_prune needs goal.speedup or compression.ratio; set one"
                )
    d = cfg.finetune.distill
    if d.enabled:
        plan.append(Distill(temperature=d.temperature, alpha=d.alpha))
    return plan


def plan_to_json(plan: list[OpConfig]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in plan]


def plan_from_json(items: list[dict[str, Any]]) -> list[OpConfig]:
    return [config_from_dict(d) for d in items]
