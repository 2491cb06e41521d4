"""Base weights from a file, the MLflow registry (alias, version) and runs:/, on a SQLite MLflow in a tmp workspace."""

from __future__ import annotations

import json
import re
import socket
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tasks.models.mlflow_source  # noqa: F401  (registers the MLflow sources)
from tasks.config import ModelConfig
from tasks.errors import ModelLoadError, ServiceError
from tasks.models import create_model
from tasks.models.register_base import register_base_model
from tasks.models.sources import SOURCES, load_base, resolve_base, resolve_weights, state_dict_sha256
from tasks.tracking import workspace_tracking_uri

ARCH = {"name": "resnet8", "kwargs": {"width": 4}, "input_shape": [1, 8, 8], "num_classes": 4}


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model("resnet8", in_channels=1, num_classes=4, width=4)
    for mod in m.modules():  # non-default BN statistics, so every buffer's bytes matter to the hash
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.num_batches_tracked.fill_(seed + 7)
    return m


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """A workspace whose registry holds `base` v1 (@production: net A) and v2 (@staging: net B), and a run
    with plain state_dict artifacts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ws = tmp_path_factory.mktemp("reg") / "ws"
        a, b = _net(0), _net(1)
        files = ws.parent / "files"
        files.mkdir()
        torch.save(a.state_dict(), files / "a.pt")
        save_file(a.state_dict(), str(files / "a.safetensors"))
        assert register_base_model(a, "base", alias="production", arch=ARCH, workspace=ws) == "1"
        assert register_base_model(b.state_dict(), "base", alias="staging", arch=ARCH, workspace=ws) == "2"
        from mlflow.tracking import MlflowClient

        uri = workspace_tracking_uri(ws)
        client = MlflowClient(uri, uri)
        run = client.create_run(client.get_experiment_by_name("shrinkflow/base-models").experiment_id).info.run_id
        client.log_artifact(run, str(files / "a.pt"), "weights")  # a plain .pt state_dict
        (files / "one").mkdir()
        save_file(a.state_dict(), str(files / "one" / "model.safetensors"))
        client.log_artifacts(run, str(files / "one"), "folder_one")  # a folder holding exactly one
        (files / "two").mkdir()
        torch.save(a.state_dict(), files / "two" / "x.pt")
        torch.save(b.state_dict(), files / "two" / "y.pt")
        client.log_artifacts(run, str(files / "two"), "folder_two")
        (files / "none").mkdir()
        (files / "none" / "README.txt").write_text("no weights here")
        client.log_artifacts(run, str(files / "none"), "folder_none")
        mv = client.get_model_version("base", "1")
        yield {"ws": ws, "a": a, "b": b, "files": files, "run": run, "model_run": mv.run_id, "client": client}


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _uris(reg) -> dict[str, list[str]]:
    """For every registered source, URIs that all hold net A."""
    f = reg["files"]
    return {
        "file": [str(f / "a.pt"), str(f / "a.safetensors"), f"file://{f / 'a.pt'}"],
        "models": ["models:/base@production", "models:/base/1"],
        "runs": [f"runs:/{reg['model_run']}/model", f"runs:/{reg['run']}/weights/a.pt",
                 f"runs:/{reg['run']}/folder_one"],
    }


@pytest.mark.parametrize("scheme", sorted(SOURCES))
def test_every_source_gives_the_same_weights_and_hash(reg, scheme):
    uris = _uris(reg)
    assert set(uris) == set(SOURCES), "a new source needs URIs in this contract test"
    want = reg["a"].state_dict()
    for uri in uris[scheme]:
        r = resolve_weights(uri, reg["ws"])
        assert r.source == scheme and r.uri == uri
        assert r.sha256 == state_dict_sha256(want), uri
        got = r.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                             for k in want), uri


def test_alias_and_version_pin_the_registry_version(reg):
    prod = resolve_weights("models:/base@production", reg["ws"])
    assert (prod.resolved, prod.version, prod.run_id) == ("models:/base/1", "1", reg["model_run"])
    assert prod.arch["name"] == "resnet8" and prod.arch["kwargs"] == {"width": 4}
    staging = resolve_weights("models:/base@staging", reg["ws"])
    latest = resolve_weights("models:/base/latest", reg["ws"])
    assert staging.resolved == latest.resolved == "models:/base/2"
    assert staging.sha256 == state_dict_sha256(reg["b"].state_dict()) != prod.sha256
    # downloaded once into the workspace cache, keyed by the pinned URI
    assert prod.path.is_relative_to(reg["ws"] / "cache" / "base_models") and (prod.path / "MLmodel").is_file()
    again = resolve_weights("models:/base/1", reg["ws"])
    assert again.path == prod.path and again.sha256 == prod.sha256
    runs = resolve_weights(f"runs:/{reg['model_run']}/model", reg["ws"])
    assert (runs.resolved, runs.version, runs.run_id) == (f"runs:/{reg['model_run']}/model", None, reg["model_run"])


def test_the_same_weights_register_once(reg):
    assert register_base_model(reg["a"], "base", input_example=torch.zeros(2, 1, 8, 8), workspace=reg["ws"]) == "1"
    assert resolve_weights("models:/base@production", reg["ws"]).version == "1"


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("models:/base@nightly", r"models:/base@nightly: registered model 'base' has no alias 'nightly'; its "
                                 r"aliases: @production \(version 1\), @staging \(version 2\).*set_registered_model_alias"),
        ("models:/base/9", r"models:/base/9: registered model 'base' has no version 9; its versions: \[1, 2\]"),
        ("models:/nope@production", r"models:/nope@production: no registered model 'nope' .*it has: base\). Fix the "
                                    r"name, or register the base first: `shrinkflow register-base"),
        ("models:/base/Production", r"not a version number.*use an alias"),
        ("runs:/0123456789abcdef/model", r"no MLflow run '0123456789abcdef'"),
        ("s3://bucket/w.pt", r"unsupported scheme 's3'"),
        ("models:/base", r"'models:/base' is not a registry URI; write models:/<name>@<alias>"),
        ("/no/such/w.pt", r"weights file /no/such/w.pt not found; fix model.weights"),
    ],
)
def test_registry_mistakes_name_the_uri_and_the_fix(reg, uri, match):
    with pytest.raises(ModelLoadError, match=match):
        resolve_weights(uri, reg["ws"])


def test_run_artifacts_without_one_weights_file(reg):
    run = reg["run"]
    with pytest.raises(ModelLoadError, match=rf"run {run} has no artifact 'nothing'; its root holds: .*folder_one"):
        resolve_weights(f"runs:/{run}/nothing", reg["ws"])
    with pytest.raises(ModelLoadError, match=r"no weights inside runs:/.*/folder_none"):
        resolve_weights(f"runs:/{run}/folder_none", reg["ws"])
    with pytest.raises(ModelLoadError, match=r"holds several weights \(x.pt, y.pt\); point model.weights at one"):
        resolve_weights(f"runs:/{run}/folder_two", reg["ws"])
    assert resolve_weights(f"runs:/{run}/folder_two/y.pt", reg["ws"]).sha256 == state_dict_sha256(reg["b"].state_dict())
    cached = sorted(p.name for p in (reg["ws"] / "cache" / "base_models").iterdir())
    bad = [c for c in cached if "folder_none" in c or re.search(r"folder_two-[0-9a-f]{12}$", c) or c.startswith(".")]
    assert not bad  # a failed download or read keeps nothing


# An unreachable registry is a ServiceError (transient: the Airflow task is retried), not a ModelLoadError.
@pytest.mark.parametrize("server", ["http://127.0.0.1:{port}", "postgresql+psycopg2://postgres:pw@127.0.0.1:{port}/test"])
def test_unreachable_registry(reg, monkeypatch, server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.format(port=port))
    shown = re.escape(server.format(port=port).replace(":pw@", ":***@"))  # the password is not printed
    with pytest.raises(ServiceError, match=rf"registry at {shown} is unreachable .* start the MLflow"):
        resolve_weights("models:/base@production", reg["ws"])


def test_pickled_mlflow_model_loads_unless_mlflow_forbids_pickle(reg, tmp_path, monkeypatch):
    import mlflow.pytorch

    mlflow.pytorch.save_model(reg["a"], str(tmp_path / "pickled"), serialization_format="pickle",
                              pip_requirements=["torch"])
    assert resolve_weights(str(tmp_path / "pickled"), reg["ws"]).sha256 == state_dict_sha256(reg["a"].state_dict())
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(ModelLoadError, match="pickle-format PyTorch model.*serialization_format='pt2'"):
        resolve_weights(str(tmp_path / "pickled"), reg["ws"])


def test_weights_that_do_not_match_the_model(reg):
    wide = ModelConfig(name="resnet8", kwargs={"width": 8}, weights="models:/base@production")
    with pytest.raises(ModelLoadError, match=r"weights in models:/base@production \(models:/base/1\) do not match "
                                             r"the model: shape mismatches .*registry records these weights as"):
        load_base(wide, in_channels=1, num_classes=4, workspace=reg["ws"])
    ok = ModelConfig(name="resnet8", kwargs={"width": 4}, weights="models:/base/2")
    model, base = load_base(ok, in_channels=1, num_classes=4, workspace=reg["ws"])
    assert base.version == "2" and state_dict_sha256(model.state_dict()) == base.sha256
    assert resolve_base(ok, reg["ws"]).sha256 == base.sha256


# --- train_base with weights from the registry, and register-base from a run's checkpoint ---

PIPES = textwrap.dedent(
    """
    pipelines:
      trainer:
        data: {source: synthetic, num_samples: 120, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 4}}
        train: {epochs: 1, batch_size: 32, lr: 0.05}
      importer:
        data: {source: synthetic, num_samples: 120, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 4}, weights: "models:/fashion-base@production"}
        train: {epochs: 3}
    """
)


def _mlflow_runs(ws: Path, run_id: str) -> dict[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    uri = workspace_tracking_uri(ws)
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("shrinkflow/importer").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`shrinkflow.run_id` = '{run_id}'")
    return {r.data.tags["shrinkflow.stage"]: r.data.tags for r in runs}


def test_train_base_imports_a_registered_base_and_records_it(tmp_path, workspace, capsys):
    from tasks.cli import main
    from tasks.stage_runner import run_stage

    p = tmp_path / "p.yaml"
    p.write_text(PIPES)
    run_stage("prepare_data", "trainer", "t1", config_path=p)
    run_stage("train_base", "trainer", "t1", config_path=p)
    trained = workspace / "runs" / "trainer" / "t1" / "train_base"
    trained_sha = json.loads((trained / "base.json").read_text())["sha256"]
    # the training team registers the trained checkpoint, as the CLI does it
    assert main(["register-base", str(trained / "model.pt"), "--name", "fashion-base", "--alias", "production"]) == 0
    assert "use it as model.weights: models:/fashion-base@production" in capsys.readouterr().out

    run_stage("prepare_data", "importer", "i1", config_path=p)
    result = run_stage("train_base", "importer", "i1", config_path=p)
    out = workspace / "runs" / "importer" / "i1"
    base = json.loads((out / "train_base" / "base.json").read_text())
    assert base["uri"] == "models:/fashion-base@production" and base["resolved"] == "models:/fashion-base/1"
    assert base["version"] == "1" and base["sha256"] == trained_sha and base["run_id"]
    assert json.loads((out / "train_base" / "metrics.json").read_text())["epochs"] == 0  # imported: no training
    assert json.loads((out / "train_base" / "history.json").read_text()) == []
    state = json.loads((out / "run.json").read_text())
    assert state["stages"]["train_base"]["base_model"]["sha256"] == trained_sha == result["base_model"]["sha256"]
    tags = _mlflow_runs(workspace, "i1")
    for stage in ("train_base", "pipeline"):
        assert tags[stage]["base_model.resolved"] == "models:/fashion-base/1", stage
        assert tags[stage]["base_model.version"] == "1" and tags[stage]["base_model.sha256"] == trained_sha
        assert tags[stage]["base_model.uri"] == "models:/fashion-base@production"

    # a new base version moves the alias; the next run picks it up and says so
    torch.manual_seed(3)
    newer = create_model("resnet8", in_channels=1, num_classes=4, width=4)
    v = register_base_model(newer, "fashion-base", alias="production",
                            arch={**ARCH, "input_shape": [1, 8, 8]}, workspace=workspace)
    assert v == "2"
    again = run_stage("train_base", "importer", "i1", config_path=p)
    assert not again["reused"] and "base model weights changed" in again["changed"]  # incremental runs see it
    base2 = json.loads((out / "train_base" / "base.json").read_text())
    assert base2["resolved"] == "models:/fashion-base/2" and base2["sha256"] == state_dict_sha256(newer.state_dict())
    assert _mlflow_runs(workspace, "i1")["pipeline"]["base_model.version"] == "2"


def test_train_base_refuses_an_unknown_alias_and_leaves_nothing(tmp_path, workspace):
    from tasks.stage_runner import run_stage

    p = tmp_path / "p.yaml"
    p.write_text(PIPES)
    run_stage("prepare_data", "importer", "i1", config_path=p)
    with pytest.raises(ModelLoadError, match=r"models:/fashion-base@production: no registered model 'fashion-base'"):
        run_stage("train_base", "importer", "i1", config_path=p)
    assert not (workspace / "runs" / "importer" / "i1" / "train_base").exists()


def test_register_base_cli_for_a_plain_state_dict(tmp_path, workspace, capsys):
    from tasks.cli import main

    net = _net(5)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    assert main(["register-base", str(tmp_path / "w.safetensors"), "--name", "plain"]) == 2  # no architecture
    assert "needs their architecture" in capsys.readouterr().err
    args = ["register-base", str(tmp_path / "w.safetensors"), "--name", "plain", "--model", "resnet8",
            "--kwargs", '{"width": 4}', "--input-shape", "1,8,8", "--num-classes", "4"]
    assert main(args) == 0
    assert "registered plain version 1; use it as model.weights: models:/plain/1" in capsys.readouterr().out
    assert resolve_weights("models:/plain/1", workspace).sha256 == state_dict_sha256(net.state_dict())


def test_register_needs_an_input_shape_or_example(tmp_path):
    with pytest.raises(ModelLoadError, match=r"needs its input shape: pass input_example"):
        register_base_model(_net(0), "x", workspace=tmp_path / "ws")
    assert not (tmp_path / "ws").exists()  # failed before touching the registry
