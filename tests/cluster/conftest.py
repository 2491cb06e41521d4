"""Fixtures for the scale-out tests: the developer's cluster (`infra/local-cluster.sh up`), or one the
tests start themselves on a pipelines file of their own (and stop, checking that no process is left)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from client import ClusterApi  # noqa: E402

from tasks import cluster  # noqa: E402

_taken = cluster._port_open


def _services_up() -> str | None:
    for what, port in (("PostgreSQL", 5432), ("Redis", 6379)):
        if not _taken(port):
            return f"{what} is not running on 127.0.0.1:{port}"
    return None


@pytest.fixture(scope="module")
def dev_cluster():
    """The cluster `infra/local-cluster.sh up` started (make cluster-test); skipped when none is up."""
    state = cluster.read_state()
    if state is None or not all(s == "healthy" for s in cluster.health(state).values()):
        pytest.skip("no healthy cluster: run `infra/local-cluster.sh up` first")
    return state


def start_own_cluster(tmp: Path, pipelines_yaml: str, workers: int = 2):
    """A fresh cluster in `tmp` with its own pipelines file (a generator: yields its state, then stops it
    and checks that no process of it survived)."""
    if why := _services_up():
        pytest.skip(why)
    if any(_taken(p) for p in cluster.PORTS.values()):
        pytest.skip(f"ports {sorted(cluster.PORTS.values())} are taken: another cluster is up "
                    "(infra/local-cluster.sh down first)")
    pipelines = tmp / "pipelines.yaml"
    pipelines.write_text(pipelines_yaml)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHRINKFLOW_CLUSTER_DIR", str(tmp / "cluster"))
        state = cluster.up(workers=workers, timeout=600, pipelines=pipelines)
        try:
            yield state
        finally:
            cluster.down()
            left = cluster.processes(state)
            assert not left, f"processes {sorted(left)} of the cluster survived `down`"


def cluster_env(state: dict) -> dict[str, str]:
    """The settings of the cluster's components (to reach its Optuna storage, MLflow, S3 from a test)."""
    env = cluster.cluster_environment(Path(state["state_dir"]), Path(state["pipelines"]))
    keys = [*cluster.read_cluster_env(), *cluster.S3_CREDENTIALS]
    return {k: env[k] for k in keys}


@pytest.fixture
def use_cluster_env(monkeypatch):
    """Point this process at a cluster's services: returns a function taking the cluster's state."""

    def apply(state: dict) -> dict[str, str]:
        for key in [k for k in os.environ if k.startswith(("AIRFLOW__", "MLFLOW_", "SHRINKFLOW_"))]:
            monkeypatch.delenv(key)
        env = cluster_env(state)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return env

    return apply


__all__ = ["ClusterApi", "start_own_cluster", "cluster_env"]
