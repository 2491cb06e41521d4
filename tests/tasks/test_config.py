from pathlib import Path

import pytest

from tasks.config import load_pipeline, load_pipelines
from tasks.errors import ConfigError, UnknownPipelineError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_pipelines_validate():
    pipelines = load_pipelines(REPO / "pipelines.yaml")
    assert {"fashion_resnet", "digits_tiny"} <= set(pipelines)
    demo = pipelines["fashion_resnet"]
    assert demo.data.source == "fashion_mnist"
    assert demo.goal.speedup == 2.0 and demo.goal.max_accuracy_drop == 0.5
    assert demo.targets == ["host", "aarch64_neon"]


def test_unknown_pipeline_lists_known_names(pipelines_file):
    with pytest.raises(UnknownPipelineError, match=r"unknown pipeline 'nope'.*synth"):
        load_pipeline("nope")


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("pipelines:\n  a: {data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_pipelines(p)


def test_invalid_field_names_path_and_expectation(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "pipelines:\n  a:\n    data: {source: synthetic, val_fraction: 0.9}\n    model: {name: resnet8}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_pipelines(p)
    msg = str(e.value)
    assert "pipelines.a.data.val_fraction" in msg and "less than 0.5" in msg


def test_unknown_key_rejected(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("pipelines:\n  a:\n    data: {source: synthetic}\n    model: {name: resnet8}\n    gaol: {}\n")
    with pytest.raises(ConfigError, match=r"pipelines\.a\.gaol"):
        load_pipelines(p)


def test_model_needs_exactly_one_source(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("pipelines:\n  a:\n    data: {source: synthetic}\n    model: {name: resnet8, factory: 'x:y'}\n")
    with pytest.raises(ConfigError, match="exactly one of 'name'"):
        load_pipelines(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipelines(tmp_path / "absent.yaml")
