"""The sensitivity scan runs only when something reads it, and its cost follows compression.sensitivity.budget_s."""

import pytest

from compression_ops import OpData
from tasks.config import DataConfig, PipelineConfig
from tasks.data.loaders import Splits
from tasks.data.sources import build_dataset
from tasks.models import create_model
from tasks.search.runner import sensitivity_scan, sensitivity_wanted


def _cfg(**over) -> PipelineConfig:
    doc = {
        "name": "t",
        "data": {"source": "digits"},
        "model": {"name": "resnet8", "kwargs": {"width": 8}},
        "goal": {"speedup": 1.5, "metric": "macs"},
        "compression": {"plan": [{"op": "channel_prune"}], "sensitivity": {}},
        "search": {"n_trials": 0},
    }
    for k, v in over.items():
        section, _, field = k.partition("__")
        if field:
            doc[section] = {**doc.get(section, {}), field: v}
        else:
            doc[section] = v
    return PipelineConfig.model_validate(doc)


@pytest.mark.parametrize(("enabled", "trials", "wanted"), [
    ("auto", 0, False), ("auto", 4, True), (True, 0, True), (False, 4, False),
])
def test_scanned_only_when_read_or_asked(enabled, trials, wanted):
    cfg = _cfg(search={"n_trials": trials}, compression={"plan": [{"op": "channel_prune"}],
                                                         "sensitivity": {"enabled": enabled}})
    got, why = sensitivity_wanted(cfg)
    assert got is wanted and why


def test_the_scan_fits_its_budget_by_scanning_fewer_images():
    sp = Splits(build_dataset(DataConfig(source="digits")))
    model = create_model("resnet8", in_channels=1, num_classes=10, width=8).eval()
    data = OpData(example=sp.example(1))
    plan = {"plan": [{"op": "channel_prune"}, {"op": "quantize_int8"}]}
    roomy = sensitivity_scan(_cfg(compression={**plan, "sensitivity": {"budget_s": 1000, "val_images": 300,
                                                                           "prune_ratios": [0.5], "weight_bits": [4]}}),
                             model, sp, data)
    tight = sensitivity_scan(_cfg(compression={**plan, "sensitivity": {"budget_s": 0.01, "val_images": 300,
                                                                           "prune_ratios": [0.5], "weight_bits": [4]}}),
                             model, sp, data)
    n_val = len(sp.tensors["val"][1])
    assert roomy["val_images"] == min(300, n_val)
    assert tight["val_images"] == min(250, n_val)  # the floor: fewer images would rank layers by noise
    assert {s["kind"] for s in roomy["scans"]} == {"channel_prune", "weight_bits"}
    assert roomy["evaluations"] == 1 + len(roomy["scans"][0]["rows"]) + len(roomy["scans"][1]["rows"])


def test_no_weight_bits_scan_without_a_quantizing_op():
    sp = Splits(build_dataset(DataConfig(source="digits")))
    model = create_model("resnet8", in_channels=1, num_classes=10, width=8).eval()
    out = sensitivity_scan(_cfg(compression={"plan": [{"op": "channel_prune"}],
                                             "sensitivity": {"prune_ratios": [0.5], "val_images": 250}}),
                           model, sp, OpData(example=sp.example(1)))
    assert [s["kind"] for s in out["scans"]] == ["channel_prune"]
