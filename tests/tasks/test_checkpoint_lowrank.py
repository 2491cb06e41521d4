import torch
from torch import nn

from compression_ops import ChannelPrune, OpData, apply
from compression_ops.low_rank import LowRank
from tasks.models import create_model, load_checkpoint, save_checkpoint
from tasks.models.checkpoint import FORMAT

X = torch.randn(1, 1, 28, 28)
ARCH = {"name": "resnet8", "kwargs": {}}


def _save_and_load(model: nn.Module, tmp_path):
    save_checkpoint(model, tmp_path / "m.pt", arch=ARCH, input_shape=[1, 28, 28], num_classes=10)
    return load_checkpoint(tmp_path / "m.pt")


def test_factorised_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10).eval()
    lr = apply(m, LowRank(rank_ratio=0.25), OpData(example=X)).model.eval()
    back, info = _save_and_load(lr, tmp_path)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), lr(x))
    assert isinstance(back.layers[1].conv1, nn.Sequential) and isinstance(back.fc, nn.Sequential)
    assert info["factorised"]["layers.1.conv1"][1]["stride"] == [2, 2]
    assert info["format"] == FORMAT


def test_pruned_then_factorised_roundtrip(tmp_path):
    m = create_model("resnet8", in_channels=1, num_classes=10).eval()
    p = apply(m, ChannelPrune(ratio=0.3), OpData(example=X)).model
    lr = apply(p, LowRank(rank_ratio=0.5), OpData(example=X)).model.eval()
    back, _ = _save_and_load(lr, tmp_path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), lr(x))


def test_checkpoint_without_factorised_key_still_loads(tmp_path):
    m = create_model("resnet8", in_channels=1, num_classes=10).eval()
    save_checkpoint(m, tmp_path / "m.pt", arch=ARCH, input_shape=[1, 28, 28], num_classes=10)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["factorised"] == {}  # the zoo's own Sequentials hold BatchNorm or nothing
    del payload["factorised"]  # as written before the key existed
    torch.save(payload, tmp_path / "old.pt")
    back, _ = load_checkpoint(tmp_path / "old.pt")
    with torch.no_grad():
        assert torch.equal(back(X), m(X))
