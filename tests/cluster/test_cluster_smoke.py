"""The scale-out topology end to end, in `make test`: a fresh cluster (infra/local-cluster.sh's, started
by the test on a small digits pipeline), one run triggered over the REST API, then `down`.

Checks: tasks spread over both Celery workers (each task instance records its worker), search trials of
both workers overlapping in the PostgreSQL study, every stage published to S3 whole with its lineage,
one version in the MLflow server's registry (its artifacts in S3), and no process left after `down`.
The full-size digits_tiny against the embedded run is `make cluster-test`; the faults `make cluster-faults`.
"""

from __future__ import annotations

import textwrap

import pytest
from checks import check_published, check_spread, check_trials, registry_versions
from client import ClusterApi
from conftest import start_own_cluster

pytestmark = pytest.mark.slow

DAG_ID = "shrinkflow__digits_tiny"
N_TRIALS = 6
PIPELINES = textwrap.dedent(
    f"""
    pipelines:
      digits_tiny:
        data: {{source: digits, val_fraction: 0.1}}
        model: {{name: resnet8, kwargs: {{width: 8}}}}
        train: {{epochs: 4, batch_size: 64, lr: 0.1}}
        goal: {{speedup: 1.3, metric: macs, max_accuracy_drop: 50.0}}
        compression:
          plan: [{{op: channel_prune}}]
          sensitivity: {{enabled: false}}
        search: {{n_trials: {N_TRIALS}, trial_epochs: 3, pruner: none}}
        finetune: {{epochs: 1, batch_size: 64, lr: 0.05}}
        targets: [host]
        compile: {{tuning: {{budget_s: 0}}}}
        benchmark: {{batch_sizes: [1], warmup: 1, repeat: 3, threads: 1}}
    """
)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    yield from start_own_cluster(tmp_path_factory.mktemp("cluster"), PIPELINES)


def test_a_run_spreads_over_two_celery_workers_and_publishes_every_stage(own_cluster, use_cluster_env):
    from tasks import object_store

    env = use_cluster_env(own_cluster)
    api = ClusterApi(own_cluster)
    api.wait_for_dag(DAG_ID)
    api.trigger(DAG_ID, "smoke-1", {"run_id": "smoke-1"})
    state = api.wait(DAG_ID, "smoke-1", timeout=900)
    assert state == "success", f"{api.task_states(DAG_ID, 'smoke-1')}\n{api.failed_logs(DAG_ID, 'smoke-1')}"

    check_spread(api, DAG_ID, "smoke-1", own_cluster["workers"])
    check_trials(env["SHRINKFLOW_OPTUNA_STORAGE"], "digits_tiny:smoke-1", N_TRIALS)
    run = check_published(object_store.ObjectStore(env["SHRINKFLOW_ARTIFACTS"]), "digits_tiny", "smoke-1")
    assert run["stages"]["register"]["promoted"] is True  # the first version becomes the champion

    versions = registry_versions(env["MLFLOW_TRACKING_URI"], "digits_tiny")
    assert [v.version for v in versions] == ["1"], versions
    assert versions[0].source.startswith(("mlflow-artifacts:", "models:/", "s3://")), versions[0].source
    # The tracking server keeps the artifacts in its S3 store, not on a worker's disk.
    import boto3

    bucket, prefix = env["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert any(k.endswith("model.pt") for k in keys), keys[:20]
