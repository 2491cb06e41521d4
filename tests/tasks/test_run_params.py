"""Trigger params: overrides merged and validated by the pipeline schema, the form's JSON schemas, run.json."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tasks.config import PipelineConfig, load_pipelines
from tasks.errors import ConfigError
from tasks.overrides import apply_overrides
from tasks.run_params import conf_from_cli, param_specs, parse_conf, parse_force, start_run

STAGES = ("prepare_data", "train_base", "search", "compress", "finetune", "compile", "benchmark", "register")
YAML = """
pipelines:
  scratch:
    data: {source: synthetic}
    model: {name: resnet8}
    goal: {speedup: 2.0, metric: macs, max_accuracy_drop: 1.0}
  registered:
    data: {source: synthetic}
    model: {name: resnet8, weights: 'models:/fashion-base@production'}
"""


@pytest.fixture
def cfgs(tmp_path: Path) -> dict[str, PipelineConfig]:
    p = tmp_path / "pipelines.yaml"
    p.write_text(YAML)
    return load_pipelines(p)


def test_apply_overrides_merges_dotted_and_nested_and_revalidates(cfgs) -> None:
    cfg = cfgs["scratch"]
    new = apply_overrides(cfg, {"goal.speedup": 2.5, "train": {"epochs": 3}, "compression.plan": [{"op": "quantize_int8"}]})
    assert (new.goal.speedup, new.goal.metric, new.train.epochs, new.train.lr) == (2.5, "macs", 3, cfg.train.lr)
    assert new.compression.plan == [{"op": "quantize_int8"}]  # lists are replaced, not merged
    assert new.name == "scratch" and cfg.goal.speedup == 2.0  # the original is untouched
    assert apply_overrides(cfg, {}) is cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"goal.speedup": 0.5}, ["goal.speedup", "greater than 1", "got 0.5", "how many times faster"]),
        ({"goal": {"metric": "flops"}}, ["goal.metric", "'macs' or 'latency'", "got 'flops'"]),
        ({"goal.sppedup": 2}, ["goal.sppedup", "not permitted", "goal has: speedup, metric"]),
        ({"train.epochs": "many"}, ["train.epochs", "valid integer", "got 'many'"]),
        ({"schedule": "every night please"}, ["schedule", "'every night please'", "'0 2 * * *'"]),
        ({"name": "other"}, ["'name' cannot be overridden"]),
        ({"goal": 3, "goal.speedup": 2}, ["'goal.speedup' conflicts"]),
        ({"goal..speedup": 2}, ["not a dotted field path"]),
    ],
)
def test_bad_overrides_name_field_value_and_fix(cfgs, overrides, expected) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(cfgs["scratch"], overrides)
    for part in expected:
        assert part in str(err.value)


def test_parse_conf_turns_params_into_overrides_that_differ(cfgs) -> None:
    cfg = cfgs["scratch"]
    # What the trigger form sends: every field, most of them unchanged.
    conf = {"speedup": 2.5, "metric": "macs", "max_accuracy_drop": 1.0, "base_model": None, "run_id": None,
            "force": False, "overrides": {"train.epochs": 3, "train.lr": cfg.train.lr}}
    params = parse_conf(conf, cfg, STAGES)
    assert params.run_id is None and params.force is None
    assert params.overrides == {"goal": {"speedup": 2.5}, "train": {"epochs": 3}}
    assert parse_conf({}, cfg, STAGES).overrides == {}
    assert parse_conf({"run_id": "nightly-1", "force": "compress"}, cfg, STAGES).run_id == "nightly-1"


@pytest.mark.parametrize(
    ("pipeline", "value", "weights"),
    [
        ("registered", "3", "models:/fashion-base/3"),
        ("registered", "staging", "models:/fashion-base@staging"),
        ("scratch", "models:/other/7", "models:/other/7"),
        ("scratch", "runs:/abc123/model", "runs:/abc123/model"),
        ("scratch", "/data/base.pt", "/data/base.pt"),
    ],
)
def test_base_model_sets_model_weights(cfgs, pipeline, value, weights) -> None:
    assert parse_conf({"base_model": value}, cfgs[pipeline], STAGES).overrides == {"model": {"weights": weights}}


@pytest.mark.parametrize(
    ("value", "fix"),
    [("3", "names no registered model in model.weights"), ("staging", "e.g. models:/<name>@staging"), ("models:/x", "models:/<name>/<version>"),
     ("runs:/abc", "runs:/<run id>/<artifact path>")],
)
def test_bad_base_model_says_the_accepted_forms(cfgs, value, fix) -> None:
    with pytest.raises(ConfigError, match="base_model") as err:
        parse_conf({"base_model": value}, cfgs["scratch"], STAGES)
    assert fix in str(err.value)


def test_force_values() -> None:
    assert [parse_force(v, STAGES) for v in (None, False, "false", "", True, "true", "all", "compress")] == [
        None, None, None, None, True, True, True, "compress"]
    with pytest.raises(ConfigError, match=r"force 'compres'.*prepare_data, train_base"):
        parse_force("compres", STAGES)


def test_unknown_params_and_bad_types_are_config_errors(cfgs) -> None:
    with pytest.raises(ConfigError, match=r"unknown trigger parameter\(s\) epochs; known: speedup.*overrides"):
        parse_conf({"epochs": 3}, cfgs["scratch"], STAGES)
    with pytest.raises(ConfigError, match="overrides .* must be a mapping"):
        parse_conf({"overrides": [1]}, cfgs["scratch"], STAGES)
    with pytest.raises(ConfigError, match="(?s)trigger parameters do not fit.*goal.speedup"):
        parse_conf({"speedup": 0.9}, cfgs["scratch"], STAGES)


def test_param_specs_carry_types_enums_and_the_pipeline_defaults(cfgs) -> None:
    specs = param_specs(cfgs["scratch"], STAGES)
    assert set(specs) == {"speedup", "max_accuracy_drop", "metric", "base_model", "run_id", "force", "overrides"}
    assert specs["speedup"]["type"] == ["number", "null"] and specs["speedup"]["exclusiveMinimum"] == 1
    assert specs["speedup"]["default"] == 2.0 and specs["max_accuracy_drop"]["default"] == 1.0
    assert specs["metric"]["enum"] == ["macs", "latency"] and specs["metric"]["default"] == "macs"
    assert specs["force"]["enum"] == [False, True, *STAGES] and specs["force"]["default"] is False
    assert specs["force"]["type"][0] == "string"  # the trigger form shows a dropdown, not a switch
    assert all(s["description"] for s in specs.values())
    assert param_specs(cfgs["registered"], STAGES)["base_model"]["default"] == "models:/fashion-base@production"


@pytest.mark.parametrize(
    ("name", "value"),
    [("speedup", 0.5), ("speedup", 1.0), ("speedup", 3), ("speedup", None), ("max_accuracy_drop", -1),
     ("max_accuracy_drop", 0), ("metric", "flops"), ("metric", "latency"), ("force", "compress"),
     ("force", "nope"), ("force", True)],
)
def test_form_schema_and_pydantic_agree(cfgs, name, value) -> None:
    """A value the trigger form accepts is one the start task accepts, and the other way round."""
    spec = {k: v for k, v in param_specs(cfgs["scratch"], STAGES)[name].items()
            if k not in ("default", "description", "title", "section", "values_display")}
    try:
        jsonschema.validate(value, spec)
        form_ok = True
    except jsonschema.ValidationError:
        form_ok = False
    try:
        parse_conf({name: value}, cfgs["scratch"], STAGES)
        schema_ok = True
    except ConfigError:
        schema_ok = False
    assert form_ok == schema_ok


def test_conf_from_cli_reads_values_as_yaml() -> None:
    assert conf_from_cli(["goal.speedup=2.5", "train.augment=true", "goal.metric=macs"], "3") == {
        "overrides": {"goal.speedup": 2.5, "train.augment": True, "goal.metric": "macs"}, "base_model": "3"}
    assert conf_from_cli(None) == {}
    with pytest.raises(ConfigError, match="give field=value"):
        conf_from_cli(["goal.speedup"])


def test_start_run_records_overrides_and_force(cfgs, tmp_path: Path) -> None:
    config = tmp_path / "pipelines.yaml"
    ws = tmp_path / "ws"
    run_id = start_run("scratch", {"speedup": 2.5, "force": "finetune", "run_id": "my run"},
                       default_run_id="manual__x", stages=STAGES, config_path=config, workspace=ws)
    assert run_id == "my-run"
    state = json.loads((ws / "runs/scratch/my-run/run.json").read_text())
    assert state["overrides"] == {"goal": {"speedup": 2.5}} and state["force"] == "finetune"
    # a bad value fails before anything is written
    with pytest.raises(ConfigError, match="goal.speedup"):
        start_run("scratch", {"speedup": 0.5}, default_run_id="bad", stages=STAGES, config_path=config, workspace=ws)
    assert not (ws / "runs/scratch/bad").exists()


def test_cli_run_rejects_bad_overrides_before_any_work(tmp_path: Path, capsys) -> None:
    from tasks.cli import main

    config = tmp_path / "pipelines.yaml"
    config.write_text(YAML)
    ws = tmp_path / "ws"
    argv = ["--config", str(config), "--workspace", str(ws), "run", "scratch", "--set", "goal.speedup=0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "goal.speedup: Input should be greater than 1 (got 0.5)" in err and "Traceback" not in err
    assert main([*argv[:6], "--base-model", "3"]) == 2
    assert "names no registered model" in capsys.readouterr().err
    assert not ws.exists()
