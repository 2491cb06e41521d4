import sys
import textwrap

import pytest
import torch

from compression_ops import ChannelPrune, OpData, apply
from tasks.errors import ArtifactError, ModelLoadError
from tasks.models import MODELS, create_model, load_checkpoint, save_checkpoint
from tasks.models.registry import _load_builtin
from tasks.models.user import build_arch, read_weights

_load_builtin()  # the zoo registers itself on import; every model in it is tested below
ZOO = sorted(MODELS)


def test_the_zoo_is_registered():
    assert {"resnet8", "resnet10", "mobilenet_tiny"} <= set(ZOO)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 10), (3, 7)])
def test_zoo_shapes(name, in_channels, num_classes):
    m = create_model(name, in_channels=in_channels, num_classes=num_classes).eval()
    assert m(torch.randn(3, in_channels, 28, 28)).shape == (3, num_classes)
    assert m(torch.randn(2, in_channels, 8, 8)).shape == (2, num_classes)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_checkpoint_roundtrip(tmp_path, name):
    torch.manual_seed(0)
    m = create_model(name, in_channels=3, num_classes=7).eval()
    save_checkpoint(m, tmp_path / "m.pt", arch={"name": name, "kwargs": {}}, input_shape=[3, 16, 16], num_classes=7)
    back, info = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), m(x))
    assert (info["input_shape"], info["num_classes"]) == ([3, 16, 16], 7)


def test_unknown_zoo_model():
    with pytest.raises(ModelLoadError, match="the zoo has: .*resnet8"):
        create_model("vgg99", in_channels=1, num_classes=10)


def test_pruned_checkpoint_roundtrip(tmp_path):
    m = create_model("mobilenet_tiny", in_channels=1, num_classes=10).eval()
    pruned = apply(m, ChannelPrune(ratio=0.4), OpData(example=torch.randn(1, 1, 28, 28))).model.eval()
    save_checkpoint(pruned, tmp_path / "m.pt", arch={"name": "mobilenet_tiny", "kwargs": {}}, input_shape=[1, 28, 28], num_classes=10)
    back, info = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(back(x), pruned(x), atol=1e-6)
    assert info["structure"]["blocks.0.dw.0"]["attrs"]["groups"] == pruned.blocks[0].dw[0].groups


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_checkpoint(tmp_path / "m.pt")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn
            def build(hidden=16):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models:build"
    sys.modules.pop("my_models", None)


def test_user_factory_and_weights(tmp_path, user_module):
    arch = {"factory": user_module, "kwargs": {"hidden": 16}}
    m = build_arch(arch, in_channels=1, num_classes=10)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    from safetensors.torch import save_file

    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    for f in ("w.pt", "w.safetensors"):
        sd = read_weights(tmp_path / f)
        assert set(sd) == set(m.state_dict())


def test_mismatched_weights_name_the_problem(tmp_path, user_module):
    from tasks.models.checkpoint import load_weights_strict

    small = build_arch({"factory": user_module, "kwargs": {"hidden": 16}}, in_channels=1, num_classes=10)
    big = build_arch({"factory": user_module, "kwargs": {"hidden": 32}}, in_channels=1, num_classes=10)
    with pytest.raises(ModelLoadError, match=r"shape mismatches .*1\.weight: file \(16, 64\) vs model \(32, 64\)"):
        load_weights_strict(big, small.state_dict(), source="w.pt")


def test_bad_factory(user_module):
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_module'"):
        build_arch({"factory": "no_such_module:f"}, in_channels=1, num_classes=10)
    with pytest.raises(ModelLoadError, match="has no callable 'nope'"):
        build_arch({"factory": "my_models:nope"}, in_channels=1, num_classes=10)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"\x00\x01junk")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        read_weights(tmp_path / "w.pt")
