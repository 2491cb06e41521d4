"""The contract every registered op config keeps, read from the registry: a newly registered op is
checked here as soon as it is imported by compression_ops, and fails until it meets the contract.

For each op: its config round-trips through JSON, apply() returns a new model and leaves its input
untouched (weights, buffers, structure, training mode), its report (and what its fine-tuning hooks
report) is JSON-serialisable. A fine-tune-phase op is refused by apply(), naming the fine-tune phase.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import compression_ops  # noqa: F401  (imports every op module, which registers the ops)
from compression_ops.base import OpConfig, OpConfigError, OpData, apply, config_from_dict, registered_configs
from tasks.models import create_model

OPS = registered_configs()
# Non-default fields an op needs to be applied at all, or to do real work on the tiny model below.
# An op missing here must apply with its defaults: test_every_op_builds_from_its_example says which.
EXAMPLES: dict[str, dict[str, Any]] = {
    "low_rank": {"rank_ratio": 0.5, "min_params_saving": None},
}
NUM_CLASSES = 10
SHAPE = (1, 8, 8)  # scikit-learn digits: 1x8x8 images, 10 classes


def example_config(op: str) -> OpConfig:
    try:
        return OPS[op](**EXAMPLES.get(op, {}))
    except (OpConfigError, TypeError) as e:
        pytest.fail(f"op {op!r} does not build from its example ({e}): add its fields to EXAMPLES in {__file__}")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", in_channels=SHAPE[0], num_classes=NUM_CLASSES, width=4).train()


def digits_like_data() -> OpData:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, *SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)) for _ in range(2)]
    return OpData(example=torch.rand(1, *SHAPE, generator=g), batches=batches, max_batches=2)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything apply() must not change on its input: tensors, structure, modes, gradients."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "structure": repr(model),
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
    }


def assert_untouched(model: nn.Module, before: dict[str, Any], op: str) -> None:
    after = snapshot(model)
    assert after["structure"] == before["structure"], f"{op} changed the input model's structure"
    assert after["modules"] == before["modules"], f"{op} changed the input model's modules or training mode"
    assert after["grads"] == before["grads"], f"{op} left gradients on the input model"
    assert after["state"].keys() == before["state"].keys(), f"{op} changed the input model's state_dict keys"
    changed = [k for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    assert not changed, f"{op} changed the input model's tensors {changed}: apply() must work on a copy"


def test_the_registry_holds_the_ops_compression_ops_exports():
    exported = {c.op for c in vars(compression_ops).values() if isinstance(c, type) and issubclass(c, OpConfig) and c.op}
    assert exported <= set(OPS) and len(OPS) >= 7


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_builds_from_its_example(op):
    assert example_config(op).op == op


@pytest.mark.parametrize("op", sorted(OPS))
def test_config_round_trips_through_json(op):
    cfg = example_config(op)
    text = json.dumps(cfg.to_dict())
    back = config_from_dict(json.loads(text))
    assert type(back) is type(cfg) and back == cfg
    assert json.dumps(back.to_dict()) == text


@pytest.mark.parametrize("op", sorted(op for op, cls in OPS.items() if cls.phase != "finetune"))
def test_apply_works_on_a_copy_and_reports_json(op):
    cfg, model, data = example_config(op), tiny_model(), digits_like_data()
    before = snapshot(model)
    res = apply(model, cfg, data)
    assert_untouched(model, before, op)
    assert res.model is not model
    assert all(p is not q for p in res.model.parameters() for q in model.parameters()), f"{op} shares parameters"
    with torch.no_grad():
        assert res.model.eval()(data.example).shape == (1, NUM_CLASSES)
    assert isinstance(res.report, dict) and json.dumps(res.report)
    for hook in res.hooks:  # fine-tuning under the op acts on the result, never on the input
        hook.before_step(0, 2)
        hook.after_step(0, 2)
        json.dumps(hook.finish())
    assert_untouched(model, before, op)


@pytest.mark.parametrize("op", sorted(op for op, cls in OPS.items() if cls.phase == "finetune"))
def test_a_finetune_op_is_refused_by_apply_and_left_to_the_finetune_phase(op):
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(OpConfigError, match="the fine-tune phase applies it"):
        apply(model, example_config(op), digits_like_data())
    assert_untouched(model, before, op)


def test_an_op_without_a_registered_handler_names_register_op():
    from dataclasses import dataclass

    from compression_ops import base

    @dataclass
    class Forgotten(OpConfig):
        op = "forgotten_for_test"

    try:
        with pytest.raises(OpConfigError, match=r"has no registered handler: .*@register_op\(Forgotten\)") as e:
            apply(tiny_model(), Forgotten())
        assert "fine-tune" not in str(e.value)
    finally:
        base._CONFIGS.pop("forgotten_for_test", None)
