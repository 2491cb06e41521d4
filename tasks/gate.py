"""The champion/challenger rule: figures of both models, measured together, in; a decision and why out.

Pure: no MLflow, no torch. The register stage measures both models on the same test split and the
same host (tasks/champion.py) and hands the figures here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.config import PromotionConfig

COSTS = {"latency": "latency_ms", "macs": "macs", "size": "size_bytes"}


@dataclass(frozen=True)
class Figures:
    """One model's figures from the register stage's own measurement (not from its training run)."""

    test_accuracy: float
    latency_ms: float | None = None
    macs: int | None = None
    size_bytes: int | None = None
    engine: str = ""


@dataclass
class Decision:
    """promote: the challenger becomes champion. checks: each rule with its figures and verdict."""

    promote: bool
    reason: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cost_check(rule: PromotionConfig, new: Figures, old: Figures) -> dict[str, Any]:
    key = COSTS[rule.cost]
    a, b = getattr(new, key), getattr(old, key)
    if a is None or b is None:
        return {"ok": False, "challenger": a, "champion": b,
                "why": f"{rule.cost} not measured for {'the challenger' if a is None else 'the champion'}"}
    limit = b * (1 + rule.latency_tolerance) if rule.cost == "latency" else b
    ok = a <= limit
    unit = {"latency": " ms", "macs": " MACs", "size": " bytes"}[rule.cost]
    fmt = (lambda v: f"{v:.3f}{unit}") if rule.cost == "latency" else (lambda v: f"{int(v):,}{unit}")
    noise = f" (champion + {100 * rule.latency_tolerance:.0f}% timing noise)" if rule.cost == "latency" else ""
    why = f"{rule.cost} {fmt(a)} {'<=' if ok else '>'} {fmt(limit)}{noise}"
    return {"ok": ok, "challenger": a, "champion": b, "limit": limit, "why": why}


def decide(rule: PromotionConfig, goal_met: bool, new: Figures, old: Figures | None) -> Decision:
    """Promote when the goal is met (if required), accuracy >= champion's - tolerance, cost no worse."""
    checks: dict[str, dict[str, Any]] = {"goal": {"ok": goal_met or not rule.require_goal, "goal_met": goal_met,
                                                  "required": rule.require_goal}}
    if not checks["goal"]["ok"]:
        return Decision(False, "goal not met", checks)
    if old is None:
        return Decision(True, "no champion yet" + ("; goal met" if goal_met else ""), checks)
    floor = old.test_accuracy - rule.accuracy_tolerance
    acc_ok = new.test_accuracy >= floor
    checks["accuracy"] = {
        "ok": acc_ok, "challenger": new.test_accuracy, "champion": old.test_accuracy, "limit": floor,
        "why": f"test accuracy {new.test_accuracy:.2f}% {'>=' if acc_ok else '<'} champion's "
               f"{old.test_accuracy:.2f}% - {rule.accuracy_tolerance:g} pt",
    }
    if rule.cost != "none":
        checks["cost"] = _cost_check(rule, new, old)
    failed = [c["why"] for c in checks.values() if not c["ok"]]
    if failed:
        return Decision(False, "; ".join(failed), checks)
    return Decision(True, "; ".join(c["why"] for k, c in checks.items() if k != "goal"), checks)
