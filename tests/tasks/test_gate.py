"""The promotion rule, as a table: goal, no champion, accuracy tolerance, each cost, timing noise."""

from __future__ import annotations

import pytest

from tasks.config import PromotionConfig
from tasks.gate import Figures, decide

CHAMP = Figures(test_accuracy=90.0, latency_ms=1.0, macs=1000, size_bytes=5000, engine="onnxruntime")


def fig(acc=90.0, ms=1.0, macs=1000, size=5000) -> Figures:
    return Figures(test_accuracy=acc, latency_ms=ms, macs=macs, size_bytes=size, engine="tvm")


@pytest.mark.parametrize(
    ("rule", "goal_met", "new", "old", "promote", "why"),
    [
        ({}, False, fig(), None, False, "goal not met"),
        ({"require_goal": False}, False, fig(), None, True, "no champion yet"),
        ({}, True, fig(acc=10.0), None, True, "no champion yet; goal met"),
        # accuracy: within the tolerance of the champion's, measured now
        ({"accuracy_tolerance": 0.1}, True, fig(acc=89.95), CHAMP, True, "test accuracy 89.95% >= champion's"),
        ({"accuracy_tolerance": 0.1}, True, fig(acc=89.85), CHAMP, False, "test accuracy 89.85% < champion's"),
        ({"accuracy_tolerance": 0.0}, True, fig(acc=90.0), CHAMP, True, ">="),
        ({"accuracy_tolerance": 2.0}, True, fig(acc=88.5), CHAMP, True, ">="),
        # latency: no worse within the timing-noise tolerance
        ({"cost": "latency", "latency_tolerance": 0.1}, True, fig(ms=1.09), CHAMP, True, "latency 1.090 ms <= 1.100 ms"),
        ({"cost": "latency", "latency_tolerance": 0.1}, True, fig(ms=1.11), CHAMP, False, "latency 1.110 ms > 1.100 ms"),
        ({"cost": "latency", "latency_tolerance": 0.0}, True, fig(ms=0.5), CHAMP, True, "latency 0.500 ms <="),
        # macs and size: strictly no worse
        ({"cost": "macs"}, True, fig(macs=1000), CHAMP, True, "macs 1,000 MACs <= 1,000 MACs"),
        ({"cost": "macs"}, True, fig(macs=1001), CHAMP, False, "macs 1,001 MACs > 1,000 MACs"),
        ({"cost": "size"}, True, fig(size=4000), CHAMP, True, "size 4,000 bytes <="),
        ({"cost": "size"}, True, fig(size=6000), CHAMP, False, "size 6,000 bytes >"),
        # cost none: only accuracy counts, however slow
        ({"cost": "none"}, True, fig(ms=100.0, macs=10**9), CHAMP, True, "test accuracy"),
        # both fail: both reasons
        ({"cost": "latency"}, True, fig(acc=50.0, ms=9.0), CHAMP, False, "< champion's 90.00% - 0.1 pt; latency"),
        # the goal is checked first, even against a champion
        ({}, False, fig(acc=99.0, ms=0.1), CHAMP, False, "goal not met"),
    ],
)
def test_rule_table(rule, goal_met, new, old, promote, why):
    d = decide(PromotionConfig(**rule), goal_met, new, old)
    assert d.promote is promote, d.reason
    assert why in d.reason


def test_a_cost_not_measured_blocks_promotion():
    d = decide(PromotionConfig(cost="latency"), True, fig(ms=None), CHAMP)
    assert not d.promote and "latency not measured for the challenger" in d.reason


def test_checks_carry_both_sets_of_figures():
    d = decide(PromotionConfig(cost="size"), True, fig(acc=91.0, size=4000), CHAMP).as_dict()
    assert d["checks"]["accuracy"]["challenger"] == 91.0 and d["checks"]["accuracy"]["champion"] == 90.0
    assert d["checks"]["cost"] | {"why": ""} == {"ok": True, "challenger": 4000, "champion": 5000, "limit": 5000, "why": ""}


def test_rule_values_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        PromotionConfig(cost="speed")
    with pytest.raises(ValidationError):
        PromotionConfig(accuracy_tolerance=-1)
