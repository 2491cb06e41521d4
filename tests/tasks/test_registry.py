"""promote and rollback: the aliases move, every move is recorded (version tags, history, an MLflow run),
and mistakes get clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks import registry
from tasks.cli import main

NAME = "shrinkflow-synth"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once (the migrations take seconds), copied per test."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("db") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def models(workspace: Path, tmp_path: Path, empty_db: Path):
    """A registered model with versions 1-3 (any folder will do as their source); v1 is champion."""
    workspace.mkdir(parents=True)
    shutil.copy(empty_db, workspace / "mlflow.db")
    paths = registry.registry_paths("synth", workspace)
    client = registry.client_for(paths)
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(tmp_path))
    registry.move_champion(client, NAME, "1", action="register", reason="no champion yet", by="test")
    return client


def _alias(client, alias: str) -> str | None:
    mv = registry.alias_version(client, NAME, alias)
    return None if mv is None else str(mv.version)


def test_promote_then_rollback_twice(models, workspace, capsys):
    client = models
    assert main(["--workspace", str(workspace), "promote", "3", "--pipeline", "synth", "--reason", "canary ok"]) == 0
    assert "champion v1 -> v3" in capsys.readouterr().out
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == ("3", "1")
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags["champion.action"] == "promote" and v3.tags["champion.reason"] == "canary ok"
    assert v3.tags["champion.by"] and v3.tags["champion.at"]
    assert client.get_model_version(NAME, "1").tags["demoted.reason"] == "canary ok"

    registry.promote("synth", "2", workspace=workspace, by="alice")
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == ("2", "3")

    # rollback goes to the champion before, and the one before that becomes previous
    out = registry.rollback("synth", reason="latency regression", workspace=workspace, by="bob")
    assert (out["from"], out["to"], out["by"]) == ("2", "3", "bob")
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == ("3", "1")
    assert main(["--workspace", str(workspace), "rollback"]) == 0  # --pipeline: the only registered one
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == ("1", None)

    hist = json.loads(client.get_registered_model(NAME).tags["champion_history"])
    assert [(h["action"], h["from"], h["to"]) for h in hist] == [
        ("register", None, "1"), ("promote", "1", "3"), ("promote", "3", "2"), ("rollback", "2", "3"),
        ("rollback", "3", "1")]
    assert hist[3]["reason"] == "latency regression" and hist[2]["by"] == "alice"
    # each manual move is an MLflow run in the pipeline's experiment
    exp = client.get_experiment_by_name("shrinkflow/synth")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`shrinkflow.stage` = 'registry'")
    assert sorted(r.data.tags["registry.action"] for r in runs) == ["promote", "promote", "rollback", "rollback"]
    assert {r.data.tags["registry.to"] for r in runs if r.data.tags["registry.action"] == "rollback"} == {"3", "1"}

    # nothing left to roll back to
    assert main(["--workspace", str(workspace), "rollback", "--pipeline", "synth"]) == 2
    assert "no previous champion" in capsys.readouterr().err


def test_rollback_after_promote_of_a_rolled_back_version(models, workspace):
    """v1 -> v2 (promote), back to v1, v2 again, back: previous never points at the version left."""
    client = models
    registry.promote("synth", "2", workspace=workspace)
    registry.rollback("synth", workspace=workspace)
    registry.promote("synth", "2", workspace=workspace)
    registry.rollback("synth", workspace=workspace)
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == ("1", None)


def test_rollback_undoes_moves_in_reverse_order(models, workspace):
    """v1 -> v2 -> v1 again by hand: rollbacks go to v2, then v1, then there is nothing left to undo."""
    client = models
    registry.promote("synth", "2", workspace=workspace)
    registry.promote("synth", "1", workspace=workspace)
    registry.rollback("synth", workspace=workspace)
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == ("2", "1")
    registry.rollback("synth", workspace=workspace)
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == ("1", None)
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback("synth", workspace=workspace)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["promote", "7", "--pipeline", "synth"], "has no version '7'; versions: 1, 2, 3"),
        (["promote", "1", "--pipeline", "synth"], "version 1 is already the champion"),
        (["promote", "2", "--pipeline", "nope"], "no registered model 'shrinkflow-nope'"),
        (["rollback", "--pipeline", "nope"], "no registered model 'shrinkflow-nope'"),
        (["rollback", "--pipeline", "synth"], "no previous champion to roll back to"),
    ],
)
def test_errors_are_clear(models, workspace, capsys, argv, message):
    assert main(["--workspace", str(workspace), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _alias(models, "champion") == "1"  # nothing moved


def test_a_frontier_points_model_is_promoted_with_point(models, workspace, capsys, tmp_path):
    point = "shrinkflow-synth-3x"
    models.create_registered_model(point)
    for _ in range(2):
        models.create_model_version(point, source=str(tmp_path))
    registry.move_champion(models, point, "1", action="register", reason="no champion yet", by="test")
    assert main(["--workspace", str(workspace), "promote", "2", "--pipeline", "synth", "--point", "3x"]) == 0
    assert "shrinkflow-synth-3x: champion v1 -> v2" in capsys.readouterr().out
    assert str(registry.alias_version(models, point, "champion").version) == "2"
    assert _alias(models, "champion") == "1"  # the pipeline's own model is left alone
    assert main(["--workspace", str(workspace), "rollback", "--pipeline", "synth", "--point", "5x"]) == 2
    assert "no registered model 'shrinkflow-synth-5x'" in capsys.readouterr().err


def test_pipeline_must_be_named_when_several_are_registered(models, workspace, capsys):
    models.create_registered_model("shrinkflow-other")
    assert main(["--workspace", str(workspace), "rollback"]) == 2
    assert "name the pipeline with --pipeline (registered pipelines: other, synth)" in capsys.readouterr().err


def test_empty_workspace(workspace, capsys, empty_db):
    workspace.mkdir(parents=True)
    shutil.copy(empty_db, workspace / "mlflow.db")
    assert main(["--workspace", str(workspace), "promote", "1"]) == 2
    assert "registered pipelines: none" in capsys.readouterr().err


PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def _postgres_up() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("where", ["file", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_registry_lock_serialises_two_holders(tmp_path, monkeypatch, where):
    """A second register waits for the first one's decision (here: a thread holding the lock): a file
    lock in the workspace, or with $SHRINKFLOW_LOCK_DB a PostgreSQL advisory lock (across machines)."""
    import threading
    import time

    if where == "postgres":
        if not _postgres_up():
            pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
        monkeypatch.setenv(registry.LOCK_DB_ENV, PG_URL)
    order: list[str] = []
    held = threading.Event()

    def first():
        with registry.registry_lock(tmp_path, NAME):
            held.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with registry.registry_lock(tmp_path, NAME):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    with registry.registry_lock(tmp_path, "shrinkflow-other"):  # another model is not held up
        pass


@pytest.mark.postgres
def test_an_advisory_lock_held_too_long_and_a_dead_lock_db_are_clear_errors(tmp_path, monkeypatch):
    import threading

    if not _postgres_up():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    monkeypatch.setenv(registry.LOCK_DB_ENV, PG_URL)
    held, release = threading.Event(), threading.Event()

    def holder():
        with registry.registry_lock(tmp_path, NAME):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        with pytest.raises(registry.RegistryError, match="was not free after 1 s"):
            with registry.registry_lock(tmp_path, NAME, timeout_s=1):
                pass
    finally:
        release.set()
        t.join()
    monkeypatch.setenv(registry.LOCK_DB_ENV, "postgresql+psycopg2://postgres@127.0.0.1:9/none")
    from tasks.errors import ServiceError

    with pytest.raises(ServiceError, match="champion lock database.*unreachable"):
        with registry.registry_lock(tmp_path, NAME):
            pass
