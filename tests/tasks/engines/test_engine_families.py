"""Every model family (tasks/models/families.py) through the engines: TVM and ONNX Runtime fp32 match
PyTorch, ONNX Runtime int8 agrees with the fake-quant PyTorch model, and channel padding of pruned
families is exact or declined. A family added to FAMILIES is tested here without editing this file.

Where an engine cannot express a family it must say so with EngineUnsupported (compile records a skip);
KNOWN_SKIPS lists those cases with what the reason must name, so a new skip, or a skip that went away,
fails here.

The whole file takes about 3 minutes on 2 busy cores (a TVM build or an int8 quantization is 3-20 s per
family), so the TVM and int8 cases are marked slow; `make test` still runs them (nothing deselects slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compression_ops import ChannelPrune, OpData, QuantizeInt8, apply
from tasks.devices import Device
from tasks.engines import get_engine
from tasks.engines.base import BuildJob, EngineUnsupported
from tasks.engines.pad_channels import pad_channels
from tasks.models.families import FAMILIES
from tasks.models.user import build_arch

HOST = Device(name="host", target={"kind": "llvm", "mcpu": "native"})
# (engine, family) -> what the EngineUnsupported message must say
KNOWN_SKIPS = {
    ("onnxruntime", "swin"): "ONNX exporter cannot decompose",
    ("onnxruntime_int8", "swin"): "ONNX exporter cannot decompose",
}


def lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised convs and linears and non-trivial BN statistics: logits of order 1 (some families
    initialise so small that every engine's logits would be ~1e-25 and any diff would pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


_MODELS: dict[str, nn.Module] = {}


def family_model(name: str) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = lively(build_arch(FAMILIES[name].arch, in_channels=1, num_classes=10))
    return _MODELS[name]


_PRUNED: dict[str, nn.Module] = {}


def pruned_model(name: str) -> nn.Module:
    """The family's model channel-pruned at 0.3 (whole heads where it has attention): odd widths, fewer
    heads, what compile gets."""
    if name not in _PRUNED:
        _PRUNED[name] = apply(family_model(name), ChannelPrune(ratio=0.3), OpData(example=images(1, 1))).model.eval()
    return _PRUNED[name]


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def decided(model: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """The n images of x whose top-1 logit leads the runner-up most. A random model on random images is
    full of near-ties, where any two quantizations of it pick different classes (MobileNetV3's fake-quant
    model agrees with its float self on 90 % of random images, ORT's int8 one on 92 %): agreement on
    decided images measures the int8 engine, not the ties."""
    with torch.inference_mode():
        top2 = model(x).topk(2, dim=1).values
    return x[(top2[:, 0] - top2[:, 1]).argsort(descending=True)[:n]]


def build(engine_name: str, name: str, root, model: nn.Module | None = None, **job) -> tuple[dict | None, str | None]:
    """(meta, None) when the engine builds the family, (None, reason) when it declines (a known skip)."""
    engine = get_engine(engine_name)
    out = root / engine.artifact_path("compressed", HOST.name)
    try:
        meta = engine.build(BuildJob(model=model or family_model(name), example=images(1, 1), device=HOST, out=out,
                                     root=root, batch_sizes=(1, 4), **job))
    except EngineUnsupported as e:
        expected = KNOWN_SKIPS.get((engine_name, name))
        assert expected, f"{engine_name} newly skips {name}: {e}"
        assert expected in str(e), f"{engine_name} skips {name} for another reason than {expected!r}: {e}"
        return None, str(e)
    assert (engine_name, name) not in KNOWN_SKIPS, f"{engine_name} now builds {name}: drop it from KNOWN_SKIPS"
    return meta, None


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_tvm_builds_the_pruned_model_and_matches_pytorch(name, tmp_path):
    """As compile builds it: the channel-pruned model, its widths padded to whole vector registers."""
    meta, skipped = build("tvm", name, tmp_path, model=pruned_model(name), pad_channels=True)
    if skipped:
        pytest.skip(skipped)
    runner = get_engine("tvm").load(tmp_path / "compressed" / "host", HOST, threads=1)
    x = images(5, 2)
    with torch.inference_mode():
        ref = pruned_model(name)(x).numpy()
    assert np.abs(ref).max() > 0.1  # real logits, not ~0
    assert np.abs(runner.run(x.numpy()) - ref).max() < 1e-3 and meta["max_abs_diff"] < 1e-3


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_onnxruntime_fp32_matches_pytorch(name, onnx_root):
    root = onnx_root / name
    meta, skipped = build("onnxruntime", name, root, pad_channels=False)
    if skipped:
        assert not (root / "compressed" / "model.onnx").exists()
        pytest.skip(skipped)
    x = images(5, 2)
    with torch.inference_mode():
        ref = family_model(name)(x).numpy()
    got = get_engine("onnxruntime").load(root / "compressed" / "model.onnx", HOST, threads=1).run(x.numpy())
    assert np.abs(got - ref).max() < 1e-4 and meta["max_abs_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_onnxruntime_int8_agrees_with_the_fake_quant_model(name, onnx_root):
    calib = images(64, 3)
    data = OpData(example=calib[:1], batches=[(calib[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in (0, 32)])
    root = onnx_root / name  # quantizes the fp32 export of the test above when it ran
    meta, skipped = build("onnxruntime_int8", name, root, pad_channels=False, calibration=lambda: calib.numpy())
    if skipped:
        pytest.skip(skipped)
    deployed = apply(family_model(name), QuantizeInt8(calibration="minmax"), data).model.eval()
    x = decided(family_model(name), images(512, 4), 128)
    with torch.inference_mode():
        ref = deployed(x).numpy()
    got = get_engine("onnxruntime_int8").load(root / "compressed" / "model.int8.onnx", HOST, threads=1).run(x.numpy())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    # what the simulation keeps float stays float: no int8 LayerNorm, Softmax, GELU or Mul kernels
    assert not {"QLinearSoftmax", "QLinearMul", "QLinearWhere", "QLinearConcat"} & set(meta["int8_ops"])


@pytest.mark.parametrize("name", ["regnet", "mobilenet_v2", "mobilenet_v3"])
def test_padding_a_pruned_family_is_exact_or_declined(name):
    """Grouped convs (RegNet, groups=2 after pruning), depthwise convs, squeeze-excitation: padding keeps
    the logits or declines, and never raises (it did on a pruned RegNet)."""
    ex = images(1, 1)
    pruned = pruned_model(name)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert any(w % 8 for w in widths)  # pruning really left odd widths
    padded, report = pad_channels(pruned, ex, 8)
    assert report["padded"] or report["reason"]
    x = images(4, 5)
    with torch.inference_mode():
        np.testing.assert_allclose(padded(x).numpy(), pruned(x).numpy(), atol=1e-4)
    if name == "regnet":  # its grouped convs keep their groups, each block widened
        grouped = [m for m in padded.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
        assert report["padded"] and grouped and all(m.in_channels % 8 == 0 for m in grouped)
        assert any(g.get("blocks", 1) > 1 for g in report["groups"])


def test_padding_never_raises(tiny_model, tiny_example, monkeypatch):
    """A failure inside padding (here: torch-pruning's graph) returns the model unpadded with the reason."""
    import tasks.engines.pad_channels as pc

    def boom(*a, **k):
        raise RuntimeError("Given groups=2, weight of size [16, 11, 3, 3], expected input to have 22 channels")

    monkeypatch.setattr(pc, "_Layout", boom)
    model = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1)).eval()
    out, report = pad_channels(model, tiny_example, 8)
    assert out is model and not report["padded"] and "groups=2" in report["reason"]


def test_tvm_names_the_op_its_importer_lacks(tmp_path):
    """An op TVM's importer has no translation for is an EngineUnsupported that names it (a skip in compile)."""

    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.special.i0(x).flatten(1)[:, :10]

    with pytest.raises(EngineUnsupported, match=r"TVM's PyTorch importer cannot translate .*i0"):
        get_engine("tvm").build(BuildJob(model=Cumulative().eval(), example=images(1, 1), device=HOST,
                                         out=tmp_path / "tvm", root=tmp_path, pad_channels=False))
