"""The compress and finetune stages write the plan's coverage (compress/coverage.json, finetune/coverage.json
with the post-training ops too), log it to MLflow, and report.md carries a coverage section."""

from __future__ import annotations

import textwrap

from mlflow.tracking import MlflowClient

from tasks.report import write_report
from tasks.stage_runner import run_stage
from tasks.workspace import read_json, run_paths

PIPELINE = textwrap.dedent(
    """
    pipelines:
      c:
        data: {source: synthetic, num_samples: 200, image_size: 8, num_classes: 4}
        model: {name: resnet8, kwargs: {width: 4}}
        train: {epochs: 1, batch_size: 32, lr: 0.05}
        goal: {max_accuracy_drop: 50}
        compression:
          plan: [{op: low_rank, energy: 0.9, layers: linear}, {op: quantize_int8, calib_batches: 1}]
        finetune: {epochs: 1, batch_size: 32, lr: 0.01, distill: {enabled: false}}
    """
)


def test_compress_and_finetune_write_coverage_and_the_report_shows_it(tmp_path, workspace):
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(PIPELINE)
    for stage in ("prepare_data", "train_base", "search", "compress", "finetune"):
        run_stage(stage, "c", "r1", config_path=cfg)
    paths = run_paths("c", "r1")
    comp = read_json(paths.stage_dir("compress") / "coverage.json")
    assert comp["ops"] == ["low_rank"] and 0 <= comp["macs_covered_fraction"] <= 1
    assert all(set(row["ops"]) == {"low_rank"} for row in comp["layers"].values())
    full = read_json(paths.stage_dir("finetune") / "coverage.json")
    assert full["ops"] == ["low_rank", "quantize_int8"] and 0 < full["macs_covered_fraction"] <= 1
    assert set(full["layers"]) == set(comp["layers"])

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shrinkflow/c").experiment_id
    for stage in ("compress", "finetune"):
        (run,) = client.search_runs([exp], filter_string=f"tags.`shrinkflow.stage` = '{stage}'")
        assert "macs_covered_fraction" in run.data.metrics
        assert "coverage.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    write_report(paths, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## Coverage: layers the plan changed" in text
    assert f"{full['macs_covered_fraction']:.1%} of the base model's MACs" in text
    assert "- **quantize_int8**: applied to" in text and "- **low_rank**:" in text
