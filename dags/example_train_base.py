"""EXAMPLE (not a shrinkflow pipeline): the training team's side of a data-aware schedule.

Trains a tiny ResNet-8 on scikit-learn's digits (a few seconds), registers it in MLflow as
`digits-base` with the alias `production`, and reports the Airflow Asset for
`models:/digits-base@production` as updated. The pipeline `digits_registered` (pipelines.yaml) has
`schedule: {model_alias: models:/digits-base@production}`, so its recompression DAG runs after each
new base, once both DAGs are unpaused. A team that trains outside Airflow reports the same asset
event through Airflow's REST API (README, "Schedules").
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, dag, task

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from tasks.schedules import MODEL_ALIAS, model_alias_asset_uri  # noqa: E402

BASE_MODEL = "models:/digits-base@production"
# The same name and URI as the consumer's schedule (dags/shrinkflow_pipelines.py builds it the same way).
BASE_ASSET = Asset(name=BASE_MODEL, uri=model_alias_asset_uri(BASE_MODEL))
EPOCHS = 3


@dag(
    dag_id="example_train_base",
    schedule=None,
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    is_paused_upon_creation=True,
    tags=["example"],
    doc_md=__doc__,
)
def example_train_base() -> None:
    @task(outlets=[BASE_ASSET])
    def train_and_register(**context: Any) -> dict[str, Any]:
        """Train the base, register it with the alias, and record the version on the asset event."""
        import torch

        from compression_ops import TrainSpec, evaluate, fit
        from tasks.config import DataConfig
        from tasks.data.loaders import Splits
        from tasks.data.sources import build_dataset
        from tasks.models import create_model, register_base_model

        # The data settings of digits_registered, so its prepare_data normalises the same way.
        ds = build_dataset(DataConfig(source="digits", val_fraction=0.1))
        splits = Splits(ds)
        torch.manual_seed(0)
        arch = {"name": "resnet8", "kwargs": {"width": 8}}
        model = create_model(arch["name"], in_channels=ds.input_shape[0], num_classes=ds.num_classes, **arch["kwargs"])
        fit(model, splits.batches("train", 64, train=True), TrainSpec(epochs=EPOCHS, lr=0.1, schedule="onecycle"))
        accuracy = evaluate(model, splits.batches("test"))["accuracy"]
        ref = MODEL_ALIAS.fullmatch(BASE_MODEL)
        version = register_base_model(model, ref["name"], alias=ref["alias"], arch=arch,
                                      input_example=splits.example(2))
        # Shown on the asset event in the UI; the consumer resolves the alias itself when it runs.
        context["outlet_events"][BASE_ASSET].extra = {"version": str(version), "test_accuracy": accuracy}
        return {"model": f"models:/{ref['name']}/{version}", "alias": ref["alias"], "test_accuracy": accuracy}

    train_and_register()


example_train_base()
