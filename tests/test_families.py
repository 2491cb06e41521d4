"""The family contract: every family of tasks/models/families.py goes through the chain.

For each family (tiny config, synthetic data, seconds each): channel pruning with whole heads, not
reverted; a checkpoint of the pruned model that rebuilds it (torch.load(weights_only=True)); the
coverage report of a [channel_prune, quantize_int8] plan. The engine half of the contract (TVM builds
the pruned, padded model and matches PyTorch, or records why it cannot; ONNX Runtime fp32 and int8
agree) is tests/tasks/engines/test_engine_families.py. A family added to FAMILIES is tested by both
without editing either.
"""

from __future__ import annotations

import pytest
import torch

from compression_ops import ChannelPrune, OpData, QuantizeInt8
from compression_ops.coverage import coverage
from tasks.config import PipelineConfig
from tasks.models.checkpoint import load_checkpoint, save_checkpoint
from tasks.models.families import FAMILIES
from tasks.models.user import build_arch
from tasks.plan import apply_ops

SHAPE = [1, 28, 28]
CFG = PipelineConfig.model_validate({"name": "families", "data": {"source": "synthetic"}, "model": {"name": "resnet8"}})


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.fixture(scope="module", params=list(FAMILIES))
def chain(request, tmp_path_factory):
    """(family, base, pruned, deployed, reports, folder) for one family: pruned at 0.3, then int8."""
    fam = FAMILIES[request.param]
    torch.manual_seed(0)
    base = build_arch(fam.arch, in_channels=1, num_classes=10)
    x, y = _data()
    base.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for i in range(0, 64, 16):
            base(x[i:i + 16])
    base.eval()
    data = OpData(example=x[:1], batches=[(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)])
    pruned, _, reports = apply_ops(CFG, base, [ChannelPrune(ratio=0.3)], data, quiet=True)
    deployed, _, post = apply_ops(CFG, pruned, [QuantizeInt8(calibration="minmax")], data, quiet=True)
    return fam, base, pruned.eval(), deployed.eval(), reports + post, tmp_path_factory.mktemp(fam.name)


def test_prune_is_not_reverted_and_reloads_from_its_checkpoint(chain):
    fam, base, pruned, _, reports, folder = chain
    prune = reports[0]
    assert "reverted" not in prune, prune.get("reverted")
    assert prune["applied"], "channel pruning changed no layer"
    assert prune["macs_after"] < prune["macs_before"]
    if "attention" in fam.features:
        assert prune["heads_after"] < prune["heads_before"]
    save_checkpoint(pruned, folder / "pruned.pt", arch=fam.arch, input_shape=SHAPE, num_classes=10)
    back, _ = load_checkpoint(folder / "pruned.pt")  # torch.load(weights_only=True) inside
    x, _ = _data(8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=1e-6)


def test_coverage_reports_every_layer_and_the_share_of_macs(chain):
    _, base, _, _, reports, _ = chain
    cov = coverage(base, _data(1)[0], reports)
    assert cov["ops"] == ["channel_prune", "quantize_int8"] and not cov["reverted"]
    assert 0.5 < cov["macs_covered_fraction"] <= 1.0
    named = {n for n, m in base.named_modules() if next(m.parameters(recurse=False), None) is not None}
    assert set(cov["layers"]) == named  # every layer with parameters is listed
    statuses = {s.split(":")[0] for row in cov["layers"].values() for s in row["ops"].values()}
    assert "applied" in statuses and "skipped" in statuses  # the classifier at least is skipped by pruning
    classifier = [n for n, row in cov["layers"].items() if row["ops"]["channel_prune"].startswith("skipped")]
    assert classifier
