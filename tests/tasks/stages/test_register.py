"""The register stage: the champion and the challenger scored on the same current split and host, the
decision recorded in MLflow, and the registered version an MLflow Model that serves in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Each test runs prepare_data and a 3-epoch train_base on synthetic data, and registers for real (~10-20 s).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
NAME = "shrinkflow-synth"

PREDICT = """
import json, sys, warnings
import numpy as np, pandas as pd, mlflow.pyfunc
x = np.load(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    m = mlflow.pyfunc.load_model("models:/shrinkflow-synth@champion")
logits = m.predict(x)
df = pd.DataFrame({"image": [row.reshape(-1).tolist() for row in x]})
np.save(sys.argv[2], np.stack([logits, m.predict(df)]))
np.save(sys.argv[3], m.predict(np.load(sys.argv[4]), params={"pixels": True}))
sig = m.metadata.signature
print(json.dumps({"engine": m.unwrap_python_model().package.engine_for(len(x)),
                  "input": list(sig.inputs.inputs[0].shape), "output": list(sig.outputs.inputs[0].shape),
                  "warnings": [str(w.message) for w in caught if "shrinkflow" in str(w.message)]}))
"""


def _client(ws: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _fresh_predict(ws: Path, tmp: Path, x: np.ndarray, pixels: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    np.save(tmp / "x.npy", x)
    np.save(tmp / "pixels.npy", pixels)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "SHRINKFLOW"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", PREDICT, str(tmp / "x.npy"), str(tmp / "out.npy"),
                           str(tmp / "out_pixels.npy"), str(tmp / "pixels.npy")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(tmp / "out.npy"), np.load(tmp / "out_pixels.npy")


def test_champion_is_an_mlflow_model_that_serves_in_a_fresh_process(workspace, fake_run, tmp_path):
    """models:/<name>@champion loads with mlflow.pyfunc in a new process and gives the benchmark's logits."""
    import torch

    from tasks.data.dataset import load_dataset_file
    from tasks.data.loaders import Splits
    from tasks.engines.pytorch_eager import TorchRunner
    from tasks.models.checkpoint import load_checkpoint

    run = fake_run("a", onnx=True)
    mv = _client(workspace).get_model_version_by_alias(NAME, "champion")
    assert mv.source.startswith("models:/m-"), mv.source  # a logged MLflow Model, not a folder
    assert mv.tags["package_sha256"] and mv.tags["gate.promoted"] == "true"
    info = json.loads((run / "prepare_data/dataset.json").read_text())
    sp = Splits(load_dataset_file(run / "prepare_data/dataset.npz"), info["mean"], info["std"])
    x = np.ascontiguousarray(sp.tensors["test"][0][:5].numpy())
    # the benchmark's reference: PyTorch eager on the fine-tuned checkpoint, normalised test images
    ref = TorchRunner(load_checkpoint(run / "finetune/model.pt")[0]).run(x)
    meta, out, out_pixels = _fresh_predict(workspace, tmp_path, x, sp.ds.x_test[:5].astype(np.float32))
    assert meta["engine"] == "onnxruntime" and not meta["warnings"]
    assert meta["input"] == [-1, 1, 8, 8] and meta["output"] == [-1, 4]
    assert out.shape == (2, 5, 4)
    np.testing.assert_allclose(out[0], ref, atol=1e-4)  # numpy input
    np.testing.assert_allclose(out[1], ref, atol=1e-4)  # DataFrame of flattened images
    np.testing.assert_allclose(out_pixels, ref, atol=1e-4)  # raw pixels, normalised inside the model
    assert not torch.equal(torch.from_numpy(ref[0]), torch.from_numpy(ref[1]))


def test_champion_is_rescored_on_the_current_split_not_its_recorded_figures(workspace, fake_run):
    """A champion registered on data version A is scored again on run B's data; its recorded accuracy
    (99 % here, made up) plays no part, and a worse challenger is kept out."""
    import torch

    from tasks.data.dataset import load_dataset_file
    from tasks.models.checkpoint import load_checkpoint

    run_a = fake_run("a", recorded_accuracy=99.0)
    run_b = fake_run("b", num_samples=300, untrained=True, recorded_accuracy=99.5,
                     promotion="{cost: none, accuracy_tolerance: 0.0}")
    dec = json.loads((run_b / "register/decision.json").read_text())
    info_a = json.loads((run_a / "prepare_data/dataset.json").read_text())
    info_b = json.loads((run_b / "prepare_data/dataset.json").read_text())
    assert info_a["hash"] != info_b["hash"] and dec["data_hash"] == info_b["hash"]
    # what the champion scores on B's test split, computed here independently (its own mean/std)
    ds_b = load_dataset_file(run_b / "prepare_data/dataset.npz")
    model, _ = load_checkpoint(run_a / "finetune/model.pt")
    mean, std = (torch.tensor(info_a[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    x = (torch.from_numpy(ds_b.x_test.astype(np.float32)) / 255 - mean) / std
    with torch.inference_mode():
        expected = 100.0 * float((model(x).argmax(1).numpy() == ds_b.y_test).mean())
    champ = dec["champion"]
    assert champ["version"] == "1" and champ["recorded_test_accuracy"] == "99.0000"
    assert abs(champ["test_accuracy"] - expected) < 1e-6 and champ["test_accuracy"] != 99.0
    assert dec["challenger"]["test_accuracy"] < champ["test_accuracy"]  # untrained, whatever it recorded
    assert not dec["promoted"] and dec["alias"] == "challenger" and "test accuracy" in dec["reason"]
    client = _client(workspace)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["gate.promoted"] == "false" and v2.tags["gate.vs_version"] == "1"
    assert float(v2.tags["gate.champion.test_accuracy"]) == round(champ["test_accuracy"], 4)
    reg = client.search_runs([client.get_experiment_by_name("shrinkflow/synth").experiment_id],
                             filter_string="tags.`shrinkflow.stage` = 'register' and tags.`shrinkflow.run_id` = 'b'")
    r = reg[0]
    assert r.data.tags["registry.promoted"] == "false" and r.data.tags["registry.champion_version"] == "1"
    assert {"challenger.test_accuracy", "champion.test_accuracy", "challenger.latency_ms",
            "champion.latency_ms", "champion.macs", "challenger.size_bytes"} <= set(r.data.metrics)
    assert "decision.json" in {a.path for a in client.list_artifacts(r.info.run_id)}


def test_an_equal_challenger_on_new_data_takes_over(workspace, fake_run):
    """A model as good on new data (within 5 points), MACs no worse: promoted, and the old
    champion becomes previous-champion with the move in the history."""
    fake_run("a")
    run_b = fake_run("b", num_samples=300, promotion="{cost: macs, accuracy_tolerance: 5.0}")
    dec = json.loads((run_b / "register/decision.json").read_text())
    assert dec["promoted"], dec["reason"]
    assert dec["checks"]["cost"]["challenger"] == dec["checks"]["cost"]["champion"]
    client = _client(workspace)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "previous-champion").version) == "1"
    hist = json.loads(client.get_registered_model(NAME).tags["champion_history"])
    assert [(h["action"], h["from"], h["to"]) for h in hist] == [("register", None, "1"), ("register", "1", "2")]


def test_a_rerun_keeps_its_version(workspace, fake_run):
    """Re-running register for the same run and package adds no version and keeps the alias."""
    from tasks.stage_runner import run_stage

    fake_run("a")
    out = run_stage("register", "synth", "a", config_path=workspace.parent / "pipelines-a.yaml",
                    workspace=workspace)
    assert out["version"] == 1 and out["alias"] == "champion" and "re-run" in out["reason"]
    versions = _client(workspace).search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 1 and versions[0].tags["gate.promoted"] == "true"  # the first decision stands


def test_a_champion_registered_as_a_plain_folder_is_scored_too(workspace, fake_run, tmp_path):
    """Versions registered before they were MLflow Models (a package folder as the source) still compete."""
    import shutil

    from tasks.registry import move_champion

    run_a = fake_run("a")
    old = tmp_path / "old-package"
    shutil.copytree(run_a / "register/model", old)
    (old / "serving.json").unlink()  # what the register stage wrote before
    client = _client(workspace)
    mv = client.create_model_version(NAME, source=str(old))
    move_champion(client, NAME, str(mv.version), action="promote", reason="an old-style version", by="test")
    run_b = fake_run("b", num_samples=300, untrained=True, promotion="{cost: latency, accuracy_tolerance: 0.0}")
    dec = json.loads((run_b / "register/decision.json").read_text())
    assert dec["champion"]["version"] == str(mv.version) and dec["champion"]["engine"] == "pytorch"
    assert dec["champion"]["test_accuracy"] > dec["challenger"]["test_accuracy"]  # trained vs untrained
    assert dec["champion"]["latency_ms"] > 0 and not dec["promoted"]
    assert set(dec["checks"]) == {"goal", "accuracy", "cost"}
    # the champion's files are gone: nothing is promoted, and the reason says what to do
    from tasks.stage_runner import run_stage

    shutil.rmtree(old)
    out = run_stage("register", "synth", "b", config_path=workspace.parent / "pipelines-b.yaml", workspace=workspace)
    assert out["alias"] == "challenger" and not out["promoted"]
    assert f"champion version {mv.version} cannot be evaluated" in out["reason"] and "shrinkflow promote" in out["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(mv.version)
