import pytest

from compression_ops import ChannelPrune, Distill
from tasks.config import PipelineConfig
from tasks.errors import ConfigError
from tasks.stages.plan import ops_in_phase, plan_from_config, plan_from_json, plan_to_json


def cfg(**over) -> PipelineConfig:
    raw = {"name": "p", "data": {"source": "synthetic"}, "model": {"name": "resnet8"},
           "goal": {"speedup": 2.0, "max_accuracy_drop": 1.0}}
    raw.update(over)
    return PipelineConfig.model_validate(raw)


def test_default_plan_prunes_for_the_goal_then_distils():
    plan = plan_from_config(cfg())
    # a speedup is measured latency unless the goal asks for MACs
    assert isinstance(plan[0], ChannelPrune) and plan[0].target_latency_reduction == 2.0
    assert isinstance(plan[-1], Distill)
    assert plan_from_json(plan_to_json(plan)) == plan
    plan = plan_from_config(cfg(goal={"speedup": 2.0, "metric": "macs"}))
    assert plan[0].target_macs_reduction == 2.0 and plan[0].target_latency_reduction is None


def test_pinned_ratio_wins_over_goal_and_distill_switch():
    plan = plan_from_config(cfg(compression={"plan": [{"op": "channel_prune", "ratio": 0.3}]},
                                finetune={"distill": {"enabled": False}}))
    assert plan == [ChannelPrune(ratio=0.3)]


def test_plan_phases_in_order():
    plan = plan_from_config(cfg(compression={"plan": [
        {"op": "channel_prune", "ratio": 0.2}, {"op": "quantize_int8", "calibration": "mse"}]}))
    assert [op.op for op in ops_in_phase(plan, "structure")] == ["channel_prune"]
    assert [op.op for op in ops_in_phase(plan, "post")] == ["quantize_int8"]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"op": "channel_prune", "ratio": 1.5}, r"plan\[0\] is invalid: ratio=1.5 is out of range"),
        ({"op": "prune_everything"}, r"plan\[0\] is invalid: unknown op 'prune_everything'; known: .*channel_prune"),
        ({"op": "channel_prune", "ration": 0.2}, r"has no field\(s\) \['ration'\]"),
        ({"op": "distill"}, r"configured under finetune.distill"),
    ],
)
def test_bad_plan_entry_names_index_and_fix(entry, match):
    with pytest.raises(ConfigError, match=match):
        plan_from_config(cfg(compression={"plan": [entry]}))


def test_prune_without_amount_or_goal_is_a_config_error():
    with pytest.raises(ConfigError, match="Set goal.speedup or a ratio"):
        plan_from_config(cfg(goal={"max_accuracy_drop": 1.0}))


def test_plan_entry_without_op_rejected_at_load():
    with pytest.raises(ValueError, match=r"plan\[0\] needs an 'op' name"):
        cfg(compression={"plan": [{"ratio": 0.3}]})
