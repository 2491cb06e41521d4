"""`shrinkflow check` and the check `shrinkflow run` does first: each mistake from issue 11 fails with its
field (or URL) and the fix, before any stage has run, and a dead service fails in bounded time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tasks.check import WAITING, check_pipeline
from tasks.cli import main
from tasks.errors import (
    ConfigError,
    DatasetError,
    ModelLoadError,
    ModelNotRegisteredError,
    ServiceError,
    TransientError,
)
from tasks.services import check_database, check_mlflow_server

REPO = Path(__file__).resolve().parents[2]
SHRINKFLOW = Path(sys.executable).parent / "shrinkflow"
BASE = {
    "data": {"source": "synthetic", "num_samples": 100, "image_size": 8, "num_classes": 4},
    "model": {"name": "resnet8", "kwargs": {"width": 8}},
    "train": {"epochs": 1, "batch_size": 32},
    "goal": {"speedup": 1.3, "metric": "macs", "max_accuracy_drop": 50.0},
    "finetune": {"epochs": 1, "batch_size": 32},
}


def write_pipeline(folder: Path, **over) -> Path:
    """A pipelines file with one pipeline, `p`: the tiny synthetic one with `over` replacing its sections."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"p": {**BASE, **over}}}))
    return path


def run_no_airflow(capsys, config: Path, ws: Path) -> str:
    """`shrinkflow run p --no-airflow` in this process; asserts it failed with exit 2; returns stderr."""
    rc = main(["--config", str(config), "--workspace", str(ws), "run", "p", "--no-airflow", "--run-id", "r1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def assert_nothing_ran(ws: Path) -> None:
    run = ws / "runs" / "p" / "r1"
    assert not run.exists() or not [d for d in run.iterdir() if d.is_dir()], "a stage ran before the check failed"


@pytest.mark.parametrize("n_trials", [0, 2], ids=["plan", "search"])
def test_unknown_op_lists_the_known_ops(tmp_path, workspace, capsys, n_trials):
    cfg = write_pipeline(tmp_path, compression={"plan": [{"op": "magic_shrink"}]}, search={"n_trials": n_trials})
    with pytest.raises(ConfigError, match=r"compression\.plan\[0\] is invalid: unknown op 'magic_shrink'; known: .*channel_prune"):
        check_pipeline("p", cfg, services=False)
    assert "unknown op 'magic_shrink'" in run_no_airflow(capsys, cfg, workspace)
    assert_nothing_ran(workspace)


@pytest.mark.parametrize("n_trials", [0, 2], ids=["plan", "search"])
def test_out_of_range_ratio_names_field_and_range(tmp_path, workspace, capsys, n_trials):
    cfg = write_pipeline(tmp_path, compression={"plan": [{"op": "channel_prune", "ratio": 1.5}]},
                         search={"n_trials": n_trials})
    with pytest.raises(ConfigError, match=r"compression\.plan\[0\] is invalid: ratio=1.5 is out of range: expected a value in \[0.0, 1.0\)"):
        check_pipeline("p", cfg, services=False)
    assert "ratio=1.5 is out of range" in run_no_airflow(capsys, cfg, workspace)
    assert_nothing_ran(workspace)


def test_plan_out_of_phase_order(tmp_path, workspace):
    cfg = write_pipeline(tmp_path, compression={"plan": [{"op": "quantize_int8"}, {"op": "channel_prune", "ratio": 0.3}]})
    with pytest.raises(ConfigError, match=r"plan\[1\] \(channel_prune, a structure op\) comes after plan\[0\] "
                                          r"\(quantize_int8, a post op\).*Move channel_prune before quantize_int8"):
        check_pipeline("p", cfg, services=False)


@pytest.mark.parametrize(("over", "field"), [({"targets": ["tpu_v9"]}, "targets"),
                                             ({"goal": {**BASE["goal"], "device": "tpu_v9"}}, "goal.device")])
def test_unknown_device_lists_the_registry(tmp_path, workspace, capsys, over, field):
    cfg = write_pipeline(tmp_path, **over)
    with pytest.raises(ConfigError) as e:
        check_pipeline("p", cfg, services=False)
    msg = str(e.value)
    assert f"{field}: unknown device 'tpu_v9'" in msg
    assert "aarch64_neon, fpga_zu7ev, host" in msg and "add the device to the registry" in msg
    assert "unknown device 'tpu_v9'" in run_no_airflow(capsys, cfg, workspace)
    assert_nothing_ran(workspace)


def test_factory_that_raises_is_a_model_error(tmp_path, workspace, capsys, monkeypatch):
    (tmp_path / "badnet.py").write_text("def net():\n    raise RuntimeError('no GPU found, giving up')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = write_pipeline(tmp_path, model={"factory": "badnet:net"})
    with pytest.raises(ModelLoadError, match=r"model.factory 'badnet:net' raised RuntimeError: no GPU found, "
                                             r"giving up .*Fix the factory"):
        check_pipeline("p", cfg, services=False)
    err = run_no_airflow(capsys, cfg, workspace)
    assert "Traceback" not in err and "badnet:net" in err
    assert_nothing_ran(workspace)


def test_module_that_fails_to_import(tmp_path, workspace, monkeypatch):
    (tmp_path / "brokenmod.py").write_text("import json\nx = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = write_pipeline(tmp_path, model={"factory": "brokenmod:net"})
    with pytest.raises(ModelLoadError, match=r"importing 'brokenmod' .* ZeroDivisionError"):
        check_pipeline("p", cfg, services=False)


def test_model_and_data_shapes_and_weights(tmp_path, workspace, monkeypatch):
    import torch

    (tmp_path / "mlp.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def net(side=8, hidden=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(side * side, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import mlp

    cfg = write_pipeline(tmp_path, model={"factory": "mlp:net", "kwargs": {"side": 28}})
    with pytest.raises(ModelLoadError, match=r"does not accept inputs of shape \[N, 1, 8, 8\]"):
        check_pipeline("p", cfg, services=False)
    torch.save(mlp.net(hidden=32).state_dict(), tmp_path / "w.pt")
    # a relative weights path counts from the pipelines file's folder
    cfg = write_pipeline(tmp_path, model={"factory": "mlp:net", "weights": "w.pt"})
    with pytest.raises(ModelLoadError, match=r"w.pt do not match the model: shape mismatches"):
        check_pipeline("p", cfg, services=False)
    cfg = write_pipeline(tmp_path, model={"factory": "mlp:net", "kwargs": {"hidden": 32}, "weights": "w.pt"})
    assert any(f"weights {tmp_path / 'w.pt'}: match the model" in line for line in check_pipeline("p", cfg, services=False))
    cfg = write_pipeline(tmp_path, model={"factory": "mlp:net", "weights": "missing.pt"})
    with pytest.raises(ModelLoadError, match=r"missing.pt not found; fix model.weights"):
        check_pipeline("p", cfg, services=False)


@pytest.mark.parametrize("uri", ["models:/digits", "runs:/"])
def test_weights_uri_form(tmp_path, workspace, uri):
    cfg = write_pipeline(tmp_path, model={**BASE["model"], "weights": uri})
    with pytest.raises(ModelLoadError, match="models:/<name>@<alias>, models:/<name>/<version>"):
        check_pipeline("p", cfg, services=False)


def test_registry_weights_are_resolved_and_matched(tmp_path, workspace):
    import torch

    from tasks.models import create_model
    from tasks.models.register_base import register_base_model

    cfg = write_pipeline(tmp_path, model={**BASE["model"], "weights": "models:/digits@champion"})
    with pytest.raises(ModelLoadError, match="models:/digits@champion"):  # nothing registered yet
        check_pipeline("p", cfg, services=False, workspace=workspace)
    net = create_model("resnet8", in_channels=1, num_classes=4, width=8)
    assert register_base_model(net, "digits", alias="champion", input_example=torch.zeros(2, 1, 8, 8),
                               workspace=workspace) == "1"
    lines = check_pipeline("p", cfg, services=False, workspace=workspace)
    assert any("models:/digits@champion -> models:/digits/1" in line and "match the model" in line for line in lines)
    other = create_model("resnet8", in_channels=1, num_classes=4, width=4)  # another width: shapes differ
    register_base_model(other, "digits", alias="champion", input_example=torch.zeros(2, 1, 8, 8), workspace=workspace)
    with pytest.raises(ModelLoadError, match="shape mismatches"):
        check_pipeline("p", cfg, services=False, workspace=workspace)


def test_missing_data_sources(tmp_path, workspace):
    cfg = write_pipeline(tmp_path, data={"source": "fashion_mnist", "path": str(tmp_path / "nowhere")})
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        check_pipeline("p", cfg, services=False)
    cfg = write_pipeline(tmp_path, data={"source": "image_folder", "path": "pictures"})
    with pytest.raises(DatasetError, match=rf"image folder {tmp_path / 'pictures'} does not exist"):
        check_pipeline("p", cfg, services=False)


def _shrinkflow(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    # The timeout only guards the test run: a hang fails it instead of blocking the suite.
    return subprocess.run([str(SHRINKFLOW), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def _env(ws: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SHRINKFLOW_OPTUNA_STORAGE")}
    env.update(SHRINKFLOW_HOME=str(ws), PYTHONPATH=str(REPO), **extra)
    return env


def test_unreachable_study_storage_fails_fast_before_training(tmp_path, workspace):
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/test"
    cfg = write_pipeline(tmp_path, search={"n_trials": 2, "storage": url})
    with pytest.raises(ServiceError) as e:
        check_pipeline("p", cfg)
    assert isinstance(e.value, TransientError)
    assert url in str(e.value) and "search.storage" in str(e.value) and "Start the database" in str(e.value)
    proc = _shrinkflow(["--config", str(cfg), "run", "p", "--no-airflow", "--run-id", "r1"], _env(workspace), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert url in proc.stderr and "Connection refused" in proc.stderr and "Traceback" not in proc.stderr
    assert_nothing_ran(workspace)


def test_unreachable_mlflow_server_fails_fast_before_training(tmp_path, workspace, monkeypatch):
    cfg = write_pipeline(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with pytest.raises(ServiceError, match=r"MLflow tracking server http://127.0.0.1:1 \(\$MLFLOW_TRACKING_URI\) is "
                                           r"unreachable: Connection refused\. Start the server"):
        check_pipeline("p", cfg)
    env = _env(workspace, MLFLOW_TRACKING_URI="http://127.0.0.1:1")
    proc = _shrinkflow(["--config", str(cfg), "run", "p", "--no-airflow", "--run-id", "r1"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "http://127.0.0.1:1" in proc.stderr and "Traceback" not in proc.stderr
    assert_nothing_ran(workspace)


def test_an_unusable_object_store_fails_fast_before_training(tmp_path, workspace, monkeypatch, s3_bucket):
    cfg = write_pipeline(tmp_path)
    monkeypatch.setenv("SHRINKFLOW_ARTIFACTS", "s3://no-such-bucket/ws")
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist. Create it"):
        check_pipeline("p", cfg)
    monkeypatch.setenv("SHRINKFLOW_ARTIFACTS", f"s3://{s3_bucket}/ws")
    assert any(line.startswith(f"object store s3://{s3_bucket}/ws: writable") for line in check_pipeline("p", cfg))
    env = _env(workspace, SHRINKFLOW_ARTIFACTS="s3://ws/x", AWS_ENDPOINT_URL="http://127.0.0.1:9",
               AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
    proc = _shrinkflow(["--config", str(cfg), "run", "p", "--no-airflow", "--run-id", "r1"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "object store s3://ws/x" in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_ran(workspace)


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers (a hung server)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.timeout(60)  # a guard for the test run: the bound under test is 1 s
def test_hung_services_are_bounded(silent_server):
    with pytest.raises(ServiceError, match=rf"127.0.0.1:{silent_server}"):
        check_mlflow_server(f"http://127.0.0.1:{silent_server}", timeout_s=1)
    with pytest.raises(ServiceError, match=rf"Optuna study storage postgresql\+psycopg2://postgres:\*\*\*@127.0.0.1:{silent_server}/test"):
        check_database(f"postgresql+psycopg2://postgres:secret@127.0.0.1:{silent_server}/test",
                       "Optuna study storage", "Fix it.", timeout_s=1)


def test_mlflow_http_requests_are_bounded_unless_the_user_set_them(monkeypatch):
    from tasks.tracking import HTTP_DEFAULTS, bound_http_requests

    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    bound_http_requests("http://mlflow.example:5000")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"  # the user's
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() < 7 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() < 2  # MLflow's own


def test_config_from_another_folder_resolves_from_its_project(tmp_path, monkeypatch):
    monkeypatch.delenv("SHRINKFLOW_HOME", raising=False)
    monkeypatch.delenv("SHRINKFLOW_DEVICES", raising=False)
    monkeypatch.delenv("SHRINKFLOW_PIPELINES", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # A project without a registry of its own: shrinkflow's registry, whatever the cwd.
    cfg = write_pipeline(tmp_path / "team", targets=["host"])
    lines = check_pipeline("p", cfg)
    assert any(f"declared in {REPO / 'infra/devices.yaml'}" in line for line in lines)
    assert any(str(tmp_path / "team" / ".shrinkflow") in line for line in lines)  # the workspace is the project's
    # A project with its own registry: its devices.
    (tmp_path / "team" / "infra").mkdir()
    (tmp_path / "team" / "infra" / "devices.yaml").write_text("devices:\n  myboard:\n    target: {kind: llvm}\n")
    cfg = write_pipeline(tmp_path / "team", targets=["myboard"], goal={**BASE["goal"], "device": "myboard"})
    lines = check_pipeline("p", cfg, services=False)
    assert any(f"declared in {tmp_path / 'team/infra/devices.yaml'}" in line for line in lines)
    # $SHRINKFLOW_DEVICES still wins.
    monkeypatch.setenv("SHRINKFLOW_DEVICES", str(REPO / "infra/devices.yaml"))
    with pytest.raises(ConfigError, match="unknown device 'myboard'"):
        check_pipeline("p", cfg, services=False)


def test_relative_data_path_counts_from_the_pipelines_file(tmp_path, monkeypatch, workspace):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "team" / "pictures" / c).mkdir(parents=True)
        Image.new("L", (12, 12)).save(tmp_path / "team" / "pictures" / c / "a.png")
    cfg = write_pipeline(tmp_path / "team", data={"source": "image_folder", "path": "pictures", "image_size": 8},
                         model={"name": "resnet8", "kwargs": {"width": 8}})
    monkeypatch.chdir(tmp_path)
    lines = check_pipeline("p", cfg, services=False)
    assert f"data image_folder ({tmp_path / 'team' / 'pictures'}): images 1x8x8, 2 classes" in lines


def test_weights_a_pipeline_is_scheduled_on_are_waited_for_not_an_error(tmp_path, workspace, capsys):
    """Before its producer registers the alias it runs on, a pipeline scheduled on that alias is waiting,
    not broken: `shrinkflow check` says so and goes on (exit 0). A run still fails fast on it, and the
    same missing model without that schedule, or on an alias it is not scheduled on, stays an error."""
    weights = {**BASE["model"], "weights": "models:/digits@production"}
    cfg = write_pipeline(tmp_path, model=weights, schedule={"model_alias": "models:/digits@production"})
    # a run checks without allow_waiting: it cannot start on weights that are not there
    with pytest.raises(ModelNotRegisteredError, match="no registered model 'digits'"):
        check_pipeline("p", cfg, services=False, workspace=workspace)
    assert "no registered model 'digits'" in run_no_airflow(capsys, cfg, workspace)
    assert_nothing_ran(workspace)
    lines = check_pipeline("p", cfg, services=False, workspace=workspace, allow_waiting=True)
    (wait,) = [line for line in lines if line.startswith(WAITING)]
    assert "models:/digits@production are not registered yet" in wait and "register-base" in wait
    assert any(line.startswith("compression plan:") for line in lines)  # the checks after it still ran
    assert main(["--config", str(cfg), "--workspace", str(workspace), "check", "p", "--no-services"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("- waiting: weights models:/digits@production") for line in out)
    assert out[-1] == "pipeline 'p': ready to run once what it waits for is there (a run before that fails)"
    for schedule in (None, {"model_alias": "models:/digits@staging"}):
        cfg = write_pipeline(tmp_path, model=weights, schedule=schedule)
        with pytest.raises(ModelNotRegisteredError, match="no registered model 'digits'"):
            check_pipeline("p", cfg, services=False, workspace=workspace, allow_waiting=True)


def test_cli_check_prints_each_line_and_exits_2_on_a_problem(tmp_path, workspace, capsys):
    cfg = write_pipeline(tmp_path)
    assert main(["--config", str(cfg), "check", "p"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"\u2713 pipelines file {cfg}: pipeline 'p' is valid")
    assert any(line.startswith("\u2713 compression plan: channel_prune") for line in out)
    assert any(line.startswith("\u2713 MLflow: SQLite in the workspace") for line in out)
    assert out[-1] == "pipeline 'p': ready to run"
    cfg = write_pipeline(tmp_path, targets=["tpu_v9"])
    assert main(["--config", str(cfg), "check", "p", "--no-services"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("\u2713 pipelines file") and "ready to run" not in captured.out
    assert captured.err.startswith("shrinkflow: error: pipeline 'p': targets: unknown device 'tpu_v9'")


def test_shipped_pipelines_pass_the_offline_check(workspace):
    assert len(check_pipeline("digits_tiny", REPO / "pipelines.yaml", services=False)) >= 6
    # on a fresh workspace the registered-base example waits for dags/example_train_base.py's registration
    lines = check_pipeline("digits_registered", REPO / "pipelines.yaml", services=False, workspace=workspace,
                           allow_waiting=True)
    assert [line for line in lines if line.startswith(WAITING)]


def test_search_workers_need_a_server_storage(tmp_path, workspace, monkeypatch):
    monkeypatch.delenv("SHRINKFLOW_OPTUNA_STORAGE", raising=False)
    cfg = write_pipeline(tmp_path, search={"n_trials": 4, "workers": 2})
    with pytest.raises(ConfigError, match=r"search.workers=2 share one study.*set search.storage"):
        check_pipeline("p", cfg)


def test_unreachable_rpc_device(tmp_path, workspace, monkeypatch):
    from tasks.errors import DeviceError

    monkeypatch.delenv("SHRINKFLOW_DEVICES", raising=False)
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra" / "devices.yaml").write_text(
        "devices:\n  host: {target: {kind: llvm}}\n"
        "  board: {target: {kind: llvm}, rpc: {host: 127.0.0.1, port: 1}}\n")
    cfg = write_pipeline(tmp_path, targets=["host", "board"])
    with pytest.raises(DeviceError, match=r"target 'board': its TVM RPC server 127.0.0.1:1 is unreachable"):
        check_pipeline("p", cfg)
    assert not any("board" in line for line in check_pipeline("p", cfg, services=False)[2:])
