import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from compression_ops import ChannelPrune, Distill, QuantizeInt8
from compression_ops.base import _CONFIGS, _OPS, OpConfig, OpConfigError, OpData, OpResult, register_op
from compression_ops.coverage import coverage
from tasks.config import PipelineConfig
from tasks.errors import ConfigError
from tasks.plan import (
    PLAN_FORMAT,
    apply_ops,
    ops_in_phase,
    plan_format,
    plan_from_config,
    plan_from_json,
    plan_to_json,
)
from tasks.workspace import read_json, write_json


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


PLAN = [ChannelPrune(ratio=0.3, importance="l1"), QuantizeInt8(calibration="mse"), Distill(temperature=2.0)]


def test_plan_json_carries_its_format_and_round_trips_through_a_file(tmp_path):
    doc = plan_to_json(PLAN)
    assert doc["format"] == PLAN_FORMAT == 2 and plan_format(doc) == 2
    assert [d["op"] for d in doc["ops"]] == ["channel_prune", "quantize_int8", "distill"]
    write_json(tmp_path / "plan.json", doc)
    assert plan_from_json(read_json(tmp_path / "plan.json")) == PLAN


def test_an_old_plan_json_without_a_version_loads_as_format_1(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps([op.to_dict() for op in PLAN]))  # what older runs wrote
    old = read_json(tmp_path / "plan.json")
    assert plan_format(old) == 1
    assert plan_from_json(old) == PLAN
    assert plan_to_json(plan_from_json(old))["format"] == PLAN_FORMAT  # rewritten in the current format


@pytest.mark.parametrize("version", [3, 99, "2"])
def test_an_unknown_plan_format_is_refused_naming_the_fix(version):
    with pytest.raises(ConfigError, match=rf"plan format {version!r} is not one this shrinkflow reads "
                                          r"\(formats 1, 2; .*upgrade shrinkflow, or re-run the search stage"):
        plan_from_json({"format": version, "ops": []})


@pytest.mark.parametrize("doc", [{"ops": []}, {"format": 2}, {"format": 2, "ops": {}}, "plan", None])
def test_a_malformed_plan_document_is_refused(doc):
    with pytest.raises(ConfigError, match=r"a plan must be \{\"format\": 2, \"ops\": \[\.\.\.\]\}"):
        plan_from_json(doc)


# --- an op that breaks the model is reverted, and coverage shows it (issue 13) ---



@pytest.fixture
def breaking_op():
    """A throwaway op config class (registered for the test only): how="raise" fails from inside, "config"
    is a user config error, "shape" returns a model with another output shape."""

    @dataclasses.dataclass
    class Breaks(OpConfig):
        op = "breaks_for_test"
        how: str = "raise"

    @register_op(Breaks)
    def breaks(model, cfg, data):
        if cfg.how == "raise":
            raise RuntimeError("shape '[1, 50, -1, 8]' is invalid for input of size 1100")
        if cfg.how == "config":
            raise OpConfigError("ratio=2 is out of range")
        return OpResult(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), {"op": cfg.op, "applied": ["1"], "skipped": {}})

    try:
        yield Breaks
    finally:
        _OPS.pop("breaks_for_test", None)
        _CONFIGS.pop("breaks_for_test", None)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))


def _data():
    x = torch.rand(4, 1, 8, 8)
    return OpData(example=x[:1], batches=[(x, torch.zeros(4, dtype=torch.long))])


@pytest.mark.parametrize(("how", "why"), [
    ("raise", r"it raised RuntimeError: shape '\[1, 50, -1, 8\]' is invalid .*\(at test_plan.py:\d+ in breaks\)"),
    ("shape", r"its model's output has shape \(1, 3\) instead of \(1, 4\)"),
])
def test_apply_ops_reverts_an_op_that_breaks_the_model(breaking_op, capsys, how, why):
    model, data = _tiny(), _data()
    with torch.no_grad():
        ref = model(data.example)
    plan = [breaking_op(how=how), QuantizeInt8()]
    out, hooks, reports = apply_ops(cfg(), model, plan, data, quiet=True)
    assert [r["op"] for r in reports] == ["breaks_for_test", "quantize_int8"]
    assert reports[0]["applied"] == [] and reports[0]["skipped"] == {}
    assert re.fullmatch(why, reports[0]["reverted"]), reports[0]["reverted"]
    # the plan went on from the model before the broken op
    assert reports[1]["applied"] == ["1", "3"]
    with torch.no_grad():
        assert out(data.example).shape == ref.shape and torch.equal(model(data.example), ref)
    line = capsys.readouterr()
    text = line.out + line.err
    assert "breaks_for_test: skipped (model left as before it): " in text and "Traceback" not in text
    cov = coverage(model, data.example, reports)
    assert {row["ops"]["breaks_for_test"] for row in cov["layers"].values()} == {f"reverted: {reports[0]['reverted']}"}
    assert cov["reverted"] == {"breaks_for_test": reports[0]["reverted"]}


def test_an_op_config_error_stays_a_config_error(breaking_op):
    with pytest.raises(ConfigError, match="breaks_for_test cannot run: ratio=2 is out of range"):
        apply_ops(cfg(), _tiny(), [breaking_op(how="config")], _data(), quiet=True)


def _family_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=g)
    return OpData(example=x[:1], batches=[(x, torch.randint(0, 10, (4,), generator=g))])
