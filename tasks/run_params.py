"""A run's trigger parameters: the Airflow trigger form's fields, and a trigger's conf made into
(run_id, overrides, force), validated by the pipeline schema itself so the form and the checks agree.

Also what a run does first (`start_run`): validate, check, and record the overrides in run.json,
where every stage reads them. No Airflow import here: the DAG file wraps the specs in `Param`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.config import GoalConfig, PipelineConfig
from tasks.errors import ConfigError
from tasks.overrides import apply_overrides, nest_overrides

# The goal fields a trigger form offers; any other field goes in `overrides`.
GOAL_PARAMS = ("speedup", "max_accuracy_drop", "metric")
PARAM_NAMES = (*GOAL_PARAMS, "base_model", "run_id", "force", "overrides")
_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))")
_RUNS_URI = re.compile(r"runs:/[^/]+/.+")
_BARE_VERSION = re.compile(r"\d+")
_BARE_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
BASE_MODEL_HELP = (
    "the base model to recompress: models:/<name>/<version>, models:/<name>@<alias>, runs:/<run>/<path> "
    "or a weights file; a bare version (3) or alias (staging) means that version or alias of the registered "
    "model named in the pipeline's model.weights. Empty: model.weights from pipelines.yaml (the base is "
    "trained from scratch when that is unset)"
)


@dataclass(frozen=True)
class RunParams:
    """What a trigger asked for: a run id (None: derive one), config overrides, and what to recompute."""

    run_id: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # nested; only what differs from pipelines.yaml
    force: bool | str | None = None  # None: reuse what is done; True: every stage; "<stage>": it and after


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """pydantic's anyOf [X, null] as one {type: [X, "null"]} schema, which the Airflow trigger form renders."""
    prop = {k: v for k, v in prop.items() if k not in ("title", "default")}
    members = prop.pop("anyOf", None)
    if members is None:
        return prop
    kinds = [m for m in members if m.get("type") != "null"]
    if len(kinds) != 1 or len(members) != 2:
        return {**prop, "anyOf": members}
    return {**prop, **kinds[0], "type": [kinds[0]["type"], "null"]}


def param_specs(cfg: PipelineConfig, stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The trigger params of a pipeline's DAG: JSON schema keywords, description and default (from `cfg`).

    The goal fields' schemas come from GoalConfig.model_json_schema(), the schema start_run validates with.
    """
    goal = GoalConfig.model_json_schema()["properties"]
    specs: dict[str, dict[str, Any]] = {}
    for name in GOAL_PARAMS:
        specs[name] = {
            **_nullable(goal[name]),
            "default": getattr(cfg.goal, name),
            "title": f"goal.{name}",
            "section": "Goal",
        }
    specs["base_model"] = {
        "type": ["string", "null"],
        "default": cfg.model.weights,
        "title": "base model",
        "description": BASE_MODEL_HELP,
        "section": "Base model",
    }
    specs["run_id"] = {
        "type": ["string", "null"],
        "default": None,
        "title": "shrinkflow run id",
        "description": "the run (workspace folder) to create or resume; empty: made from the Airflow run id",
        "section": "Run",
    }
    # "string" first: the trigger form picks its widget by the first type (a dropdown here, not a switch).
    specs["force"] = {
        "type": ["string", "boolean"],
        "enum": [False, True, *stages],
        "values_display": {"false": "no: reuse what is done", "true": "every stage", **{s: f"{s} and after" for s in stages}},
        "default": False,
        "title": "force",
        "description": "recompute stages whose output could be reused: false (none), true (all) or a stage "
        "(it and every stage after it)",
        "section": "Run",
    }
    specs["overrides"] = {
        "type": "object",
        "default": {},
        "title": "other overrides",
        "description": 'any other pipelines.yaml field for this run, dotted or nested, e.g. {"train.epochs": 3}',
        "section": "Run",
    }
    return specs


def parse_force(value: Any, stages: Sequence[str]) -> bool | str | None:
    """force from a trigger or the CLI: None (reuse), True (all stages) or a stage name."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false", "no", "none")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "all", "yes")):
        return True
    if isinstance(value, str) and value in stages:
        return value
    raise ConfigError(
        f"force {value!r} is not valid: give false (reuse what is done), true (recompute every stage) or a "
        f"stage to recompute it and every stage after it: {', '.join(stages)}"
    )


def base_model_uri(value: str, cfg: PipelineConfig) -> str:
    """What `base_model` means as a model.weights value; a bare version or alias refers to model.weights' model."""
    text = value.strip()
    bare_version = _BARE_VERSION.fullmatch(text) is not None
    if bare_version or _BARE_ALIAS.fullmatch(text):
        registered = _REGISTRY_URI.fullmatch(cfg.model.weights or "")
        if registered is None:
            example = f"models:/<name>/{text}" if bare_version else f"models:/<name>@{text}"
            raise ConfigError(
                f"base_model {value!r} is a bare {'version' if bare_version else 'alias'}, but pipeline "
                f"{cfg.name!r} names no registered model in model.weights (it is {cfg.model.weights!r}); "
                f"give the full URI, e.g. {example}"
            )
        return f"models:/{registered['name']}/{text}" if bare_version else f"models:/{registered['name']}@{text}"
    if text.startswith("models:/") and not _REGISTRY_URI.fullmatch(text):
        raise ConfigError(f"base_model {value!r} must look like models:/<name>/<version> or models:/<name>@<alias>")
    if text.startswith("runs:/") and not _RUNS_URI.fullmatch(text):
        raise ConfigError(f"base_model {value!r} must look like runs:/<run id>/<artifact path>")
    return text


def _changed(overrides: dict[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that differ from the current values (a trigger form sends every field, changed or not)."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        now = current.get(key) if isinstance(current, Mapping) else None
        if isinstance(value, dict) and isinstance(now, Mapping):
            sub = _changed(value, now)
            if sub:
                out[key] = sub
        elif key not in current or value != now:
            out[key] = value
    return out


def parse_conf(conf: Mapping[str, Any] | None, cfg: PipelineConfig, stages: Sequence[str]) -> RunParams:
    """A trigger's conf (or the CLI's) as RunParams, validated by the pipeline schema; ConfigError otherwise."""
    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(PARAM_NAMES))
    if unknown:
        raise ConfigError(
            f"unknown trigger parameter(s) {', '.join(unknown)}; known: {', '.join(PARAM_NAMES)}. Other "
            'pipelines.yaml fields go in overrides, e.g. {"overrides": {"train.epochs": 3}}'
        )
    run_id = conf.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise ConfigError(f"run_id {run_id!r} must be a string (letters, digits, '_', '-' and '.')")
    raw = conf.get("overrides") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f'overrides {raw!r} must be a mapping of fields to values, e.g. {{"train.epochs": 3}}')
    overrides = nest_overrides(raw)
    given = {name: conf[name] for name in GOAL_PARAMS if conf.get(name) is not None}
    if given:
        overrides = nest_overrides({**overrides, "goal": {**overrides.get("goal", {}), **given}})
    if "frontier" in (overrides.get("goal") or {}):
        raise ConfigError(
            "goal.frontier cannot be changed for one run: its points shape the DAG (a task group per point). "
            "Change it in pipelines.yaml, or trigger with speedup for a single point on a pipeline without a frontier"
        )
    if conf.get("base_model"):
        if not isinstance(conf["base_model"], str):
            raise ConfigError(f"base_model {conf['base_model']!r} must be a string; it is {BASE_MODEL_HELP}")
        overrides = nest_overrides({**overrides, "model.weights": base_model_uri(conf["base_model"], cfg)})
    apply_overrides(cfg, overrides, source="trigger parameters")  # raises ConfigError naming field and fix
    return RunParams(
        run_id=run_id or None,
        overrides=_changed(overrides, cfg.model_dump()),
        force=parse_force(conf.get("force"), stages),
    )


def _check_pipeline(
    pipeline: str, config_path: str | os.PathLike | None, workspace: str | os.PathLike | None, overrides: dict
) -> list[str]:
    """The fail-fast checks of tasks.check (everything that needs no training), when that module is present."""
    try:
        from tasks.check import check_pipeline
    except ModuleNotFoundError as e:
        if e.name != "tasks.check":
            raise
        return []  # a tree without tasks.check: the schema validation above is the whole check
    return check_pipeline(pipeline, config_path, workspace=workspace, overrides=overrides)


def start_run(
    pipeline: str,
    conf: Mapping[str, Any] | None,
    *,
    default_run_id: str,
    stages: Sequence[str],
    config_path: str | os.PathLike | None = None,
    workspace: str | os.PathLike | None = None,
    check: bool = True,
) -> str:
    """Validate a trigger's params, run the fail-fast checks, record overrides and force in run.json; the run id."""
    from tasks.config import load_pipeline
    from tasks.workspace import run_paths

    cfg = load_pipeline(pipeline, config_path)
    params = parse_conf(conf, cfg, stages)
    paths = run_paths(pipeline, params.run_id or default_run_id, workspace)
    if check:
        _check_pipeline(pipeline, config_path, workspace, params.overrides)
    # run_stage applies these to the pipeline config and honours force (a cleared task reads them again).
    paths.update_state(pipeline=pipeline, run_id=paths.run_id, overrides=params.overrides, force=params.force)
    return paths.run_id


def conf_from_cli(sets: Sequence[str] | None, base_model: str | None = None) -> dict[str, Any]:
    """`shrinkflow run --set goal.speedup=2.5 --base-model X` as a trigger conf (values read as YAML)."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in sets or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: give field=value, e.g. --set goal.speedup=2.5 or --set train.epochs=3")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e}); quote it") from None
    conf: dict[str, Any] = {"overrides": overrides} if overrides else {}
    if base_model:
        conf["base_model"] = base_model
    return conf
