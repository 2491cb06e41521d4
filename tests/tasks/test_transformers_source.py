"""Model sources beside the zoo and factories: transformers by config and from a save_pretrained folder
(never the hub), and a torch.export .pt2; each loads, records its lineage, checkpoints, and fails with a
ModelLoadError (or `shrinkflow check` error) that names the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from tasks.check import check_pipeline
from tasks.config import ModelConfig
from tasks.errors import ConfigError, ModelLoadError
from tasks.fingerprint import model_files_identity
from tasks.models import load_checkpoint, save_checkpoint
from tasks.models.families import FAMILIES
from tasks.models.sources import load_base, state_dict_sha256
from tasks.models.user import arch_of, build_arch

HF = [n for n, f in FAMILIES.items() if "transformers" in f.arch]
X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _saved(family: str, folder: Path, channels: int = 1) -> nn.Module:
    torch.manual_seed(1)
    model = build_arch(FAMILIES[family].arch, in_channels=channels, num_classes=10).eval()
    model.model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("family", HF)
def test_by_config(family):
    cfg = ModelConfig(**{k: v for k, v in FAMILIES[family].arch.items()})
    model = build_arch(arch_of(cfg), in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        assert model(X).shape == (3, 10)
    assert cfg.label() == f"transformers {FAMILIES[family].arch['transformers']['model_type']}"


@pytest.mark.parametrize("family", HF)
def test_folder_loads_the_saved_model_and_its_checkpoint_rebuilds_without_it(family, tmp_path):
    saved = _saved(family, tmp_path / "hf")
    cfg = ModelConfig(transformers=str(tmp_path / "hf"))
    model, base = load_base(cfg, in_channels=1, num_classes=10)
    with torch.no_grad():
        assert torch.equal(model.eval()(X), saved(X))
    assert base.source == "transformers" and base.resolved == str((tmp_path / "hf").resolve())
    # the weights as save_pretrained wrote them (transformers may rename keys on disk)
    assert base.sha256 == state_dict_sha256(load_file(str(tmp_path / "hf" / "model.safetensors")))
    arch = arch_of(cfg)
    assert arch["transformers"]["model_type"] == FAMILIES[family].arch["transformers"]["model_type"]
    save_checkpoint(model, tmp_path / "m.pt", arch=arch, input_shape=[1, 28, 28], num_classes=10)
    shutil.rmtree(tmp_path / "hf")
    back, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(back(X), saved(X))


def test_rgb_folder_on_grayscale_data_sums_the_stem(tmp_path):
    rgb = _saved("vit", tmp_path / "hf", channels=3)
    model, _ = load_base(ModelConfig(transformers=str(tmp_path / "hf")), in_channels=1, num_classes=10)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), rgb(X.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    five, _ = load_base(ModelConfig(transformers=str(tmp_path / "hf")), in_channels=1, num_classes=5)
    assert five(X).shape == (3, 5)  # a head of another size follows the data
    _saved("vit", tmp_path / "other", channels=3)
    (tmp_path / "other" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    assert model_files_identity(str(tmp_path / "other")) == model_files_identity(str(tmp_path / "hf"))
    rgb.model.classifier.bias.data += 1
    rgb.model.save_pretrained(str(tmp_path / "other"))
    assert model_files_identity(str(tmp_path / "other")) != model_files_identity(str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match=r"takes 3-channel images but the data has 2"):
        load_base(ModelConfig(transformers=str(tmp_path / "hf")), in_channels=2, num_classes=10)


def test_folder_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match=r"is not an existing folder; .*save_pretrained.*never downloads"):
        load_base(ModelConfig(transformers="google/vit-base-patch16-224"), in_channels=1, num_classes=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config.json"):
        load_base(ModelConfig(transformers=str(tmp_path / "empty")), in_channels=1, num_classes=10)
    _saved("resnet_basic", tmp_path / "noweights")
    for f in (tmp_path / "noweights").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match=r"noweights"):
        load_base(ModelConfig(transformers=str(tmp_path / "noweights")), in_channels=1, num_classes=10)
    with pytest.raises(ValidationError, match=r"holds its own weights: drop model.weights"):
        ModelConfig(transformers=str(tmp_path), weights="w.pt")


@pytest.mark.parametrize(("fields", "message"), [
    ({"model_type": "bert"}, r"'bert' has no image-classification model"),
    ({"model_type": "no_such_model"}, r"model_type 'no_such_model' is not a transformers config"),
    ({"model_type": "vit", "hidden_size": "big"}, r"a field of the 'vit' config is invalid: .*hidden_size.*expected int"),
    ({"model_type": "convnext", "hidden_sizes": [16], "depths": [1, 1]}, r"cannot build 'convnext': IndexError"),
    ({"patch_size": 4}, r"needs a model_type"),
])
def test_bad_config_is_a_model_error(fields, message):
    with pytest.raises(ModelLoadError, match=message):
        build_arch({"transformers": fields, "kwargs": {}}, in_channels=1, num_classes=10)


def _export(tmp_path: Path, dynamic: bool = True) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 28 * 28, 10)).eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    path = tmp_path / ("net.pt2" if dynamic else "static.pt2")
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=shapes), str(path))
    return net, path


def test_exported_roundtrip(tmp_path):
    net, path = _export(tmp_path)
    cfg = ModelConfig(exported=str(path))
    model, base = load_base(cfg, in_channels=1, num_classes=10)
    model.train()
    model.eval()  # the graph itself refuses both; the wrapper takes them
    with torch.no_grad():
        assert torch.equal(model(X), net(X))
    assert base.source == "exported" and base.sha256 == state_dict_sha256(net.state_dict())
    arch = arch_of(cfg)
    save_checkpoint(model, tmp_path / "m.pt", arch=arch, input_shape=[1, 28, 28], num_classes=10)
    back, info = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(back(X), net(X))
    assert info["arch"]["sha256"] == arch["sha256"]
    before = model_files_identity(str(path))
    _export(tmp_path)  # the same net, written again: same bytes or not, the recorded hash decides
    net.apply(lambda m: isinstance(m, nn.Linear) and nn.init.zeros_(m.bias))
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 28, 28),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    assert model_files_identity(str(path)) != before
    with pytest.raises(ModelLoadError, match=r"changed since the checkpoint was written"):
        load_checkpoint(tmp_path / "m.pt")


def test_an_exported_model_is_counted_and_compiled(tmp_path):
    """A .pt2 has no Conv2d/Linear modules: MACs come from torch's FLOP counter, and the engines export the
    graph itself (through the wrapper its attributes were out of reach of TVM and the ONNX exporter)."""
    from compression_ops.metrics import count_macs
    from tasks.devices import Device
    from tasks.engines import get_engine
    from tasks.engines.base import BuildJob

    net, path = _export(tmp_path)
    model, _ = load_base(ModelConfig(exported=str(path)), in_channels=1, num_classes=10)
    assert count_macs(model, X[:1]) == 4 * 9 * 28 * 28 + 4 * 28 * 28 * 10  # the conv's and the linear's
    host = Device(name="host", target={"kind": "llvm", "mcpu": "native"})
    for engine in ("onnxruntime", "tvm"):
        out = tmp_path / engine / get_engine(engine).artifact_path("compressed", "host")
        meta = get_engine(engine).build(BuildJob(model=model.eval(), example=X[:1], device=host, out=out,
                                                 root=tmp_path / engine, batch_sizes=(1, 2), pad_channels=False))
        assert meta["max_abs_diff"] < 1e-4, engine


def test_exported_errors(tmp_path):
    _, static = _export(tmp_path, dynamic=False)
    with pytest.raises(ModelLoadError, match=r"fixed batch of 2; .*dynamic_shapes"):
        load_base(ModelConfig(exported=str(static)), in_channels=1, num_classes=10)
    with pytest.raises(ModelLoadError, match=r"no such file"):
        load_base(ModelConfig(exported=str(tmp_path / "none.pt2")), in_channels=1, num_classes=10)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match=r"not a torch.export archive"):
        load_base(ModelConfig(exported=str(tmp_path / "junk.pt2")), in_channels=1, num_classes=10)


def _pipeline(folder: Path, model: dict, plan: list | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = {"data": {"source": "synthetic", "num_samples": 100, "image_size": 28, "num_classes": 10},
         "model": model, "train": {"epochs": 1, "batch_size": 32},
         "goal": {"speedup": 1.3, "metric": "macs", "max_accuracy_drop": 50.0}, "finetune": {"epochs": 1}}
    if plan is not None:
        p["compression"] = {"plan": plan}
    (folder / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": {"p": p}}))
    return folder / "pipelines.yaml"


def test_check_names_an_image_size_mismatch(tmp_path, workspace):
    vit = {**FAMILIES["vit"].arch["transformers"], "image_size": 32}
    cfg = _pipeline(tmp_path, {"transformers": vit})
    with pytest.raises(ModelLoadError, match=r"does not accept inputs .*image_size=32 \(patch_size=4\) but the "
                                             r"data's images are 28x28: set image_size"):
        check_pipeline("p", cfg, services=False)


def test_check_loads_sources_that_hold_their_weights(tmp_path, workspace):
    _saved("convnext", tmp_path / "hf")
    lines = check_pipeline("p", _pipeline(tmp_path, {"transformers": "hf"}), services=False)  # relative: project
    assert any(line.startswith("weights: held by model transformers folder") for line in lines)
    _, path = _export(tmp_path)
    lines = check_pipeline("p", _pipeline(tmp_path, {"exported": path.name}, plan=[]),
                           services=False)
    assert any("exported" in line and "builds" in line for line in lines)
    with pytest.raises(ConfigError, match=r"plan\[0\] \(channel_prune\) cannot apply to model.exported: .*"
                                          r"model.factory \+ model.weights"):
        check_pipeline("p", _pipeline(tmp_path, {"exported": path.name}, plan=[{"op": "channel_prune", "ratio": 0.3}]),
                       services=False)
