"""Bad inputs fail with a clear message and leave no partial artifact behind."""

import textwrap

import pytest
import torch

from tasks.errors import DatasetError, ModelLoadError, StageError, UnknownPipelineError
from tasks.stage_runner import run_stage
from tasks.workspace import run_paths


def _stage_dirs(ws, pipeline, run_id):
    d = run_paths(pipeline, run_id, ws).run_dir
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.exists() else []


def test_unknown_pipeline(pipelines_file, workspace):
    with pytest.raises(UnknownPipelineError, match="declares: synth"):
        run_stage("prepare_data", "nope", "r1")
    assert not (workspace / "runs" / "nope").exists()


def test_unknown_stage(pipelines_file, workspace):
    with pytest.raises(StageError, match="unknown stage 'trian'"):
        run_stage("trian", "synth", "r1")


def test_stage_before_its_inputs(pipelines_file, workspace):
    with pytest.raises(StageError, match="stage 'prepare_data' has not run"):
        run_stage("train_base", "synth", "r1")
    assert _stage_dirs(workspace, "synth", "r1") == []


def test_missing_dataset(tmp_path, monkeypatch, workspace):
    p = tmp_path / "p.yaml"
    p.write_text(f"pipelines:\n  f:\n    data: {{source: fashion_mnist, path: {tmp_path / 'nowhere'}}}\n"
                 "    model: {name: resnet8}\n")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        run_stage("prepare_data", "f", "r1", config_path=p)
    assert _stage_dirs(workspace, "f", "r1") == []
    assert not list((workspace / "runs" / "f" / "r1").glob(".*tmp"))  # no scratch left either


def test_mismatched_weights(tmp_path, monkeypatch, workspace):
    (tmp_path / "netmod.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def net(hidden=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    netmod = importlib.import_module("netmod")
    torch.save(netmod.net(hidden=32).state_dict(), tmp_path / "w.pt")
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(f"""
        pipelines:
          u:
            data: {{source: synthetic, num_samples: 100, num_classes: 4}}
            model: {{factory: "netmod:net", kwargs: {{hidden: 16}}, weights: "{tmp_path / 'w.pt'}"}}
    """))
    run_stage("prepare_data", "u", "r1", config_path=p)
    with pytest.raises(ModelLoadError, match=r"do not match the model: shape mismatches .*file \(32, 64\) vs model \(16, 64\)"):
        run_stage("train_base", "u", "r1", config_path=p)
    assert _stage_dirs(workspace, "u", "r1") == ["prepare_data"]


def test_model_that_rejects_the_input_shape(tmp_path, monkeypatch, workspace):
    (tmp_path / "netmod2.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def net():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 4))  # expects 28x28, the data is 8x8
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    p = tmp_path / "p.yaml"
    p.write_text("pipelines:\n  u:\n    data: {source: synthetic, num_samples: 100, num_classes: 4}\n"
                 "    model: {factory: 'netmod2:net'}\n")
    run_stage("prepare_data", "u", "r1", config_path=p)
    with pytest.raises(ModelLoadError, match=r"does not accept inputs of shape \[N, 1, 8, 8\]"):
        run_stage("train_base", "u", "r1", config_path=p)
    assert _stage_dirs(workspace, "u", "r1") == ["prepare_data"]
