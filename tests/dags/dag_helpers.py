"""Shared by the DAG tests: a pipelines file in tmp_path for the DAG file to read, and the DagBag it builds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.orchestrate import DAGS_FOLDER, embedded_airflow


def use_pipelines(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write `text` as the pipelines file with a workspace beside it; drop the shell's AIRFLOW__* and retry settings."""
    for key in [k for k in os.environ if k.startswith(("AIRFLOW", "SHRINKFLOW_TASK_RETRIES", "SHRINKFLOW_RETRY"))]:
        monkeypatch.delenv(key)
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    monkeypatch.setenv("SHRINKFLOW_PIPELINES", str(path))
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "ws"))
    return path


def dagbag(tmp_path: Path):
    """The DAGs of the dags folder, parsed under the embedded settings of tmp_path's workspace."""
    with embedded_airflow(tmp_path / "ws", migrate=False):
        from airflow.dag_processing.dagbag import DagBag

        return DagBag(dag_folder=str(DAGS_FOLDER))
