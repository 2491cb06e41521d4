"""Overrides of a pipeline's config for one run (trigger params, `shrinkflow run --set`), validated by the
same schema as pipelines.yaml."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from tasks.config import PipelineConfig, resolve_project_paths, validation_error_lines
from tasks.errors import ConfigError


def nest_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys ({"goal.speedup": 2.5}) made nested ({"goal": {"speedup": 2.5}}), merged with nested ones."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is not a dotted field path such as goal.speedup or train.epochs")
        value = nest_overrides(value) if isinstance(value, Mapping) else value
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override that sets {part!r} to a value")
        last = parts[-1]
        if isinstance(node.get(last), dict) and isinstance(value, dict):
            node[last] = _deep_merge(node[last], value)
        elif last in node:
            raise ConfigError(f"override {key!r} is given twice; keep one")
        else:
            node[last] = value
    return out


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` merged into a copy of `base`: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(
    cfg: PipelineConfig, overrides: Mapping[str, Any] | None, *, source: str = "overrides"
) -> PipelineConfig:
    """`cfg` with `overrides` (nested or dotted keys) deep-merged in and validated again by the same schema.

    A bad value is a ConfigError naming the field, the value given, what the field means and the fix.
    """
    if not overrides:
        return cfg
    nested = nest_overrides(overrides)
    if "name" in nested:
        raise ConfigError(f"{source}: 'name' cannot be overridden; it is the pipeline's key in pipelines.yaml")
    try:
        new = PipelineConfig.model_validate(_deep_merge(cfg.model_dump(), nested))
    except ValidationError as err:
        lines = [f"{source} do not fit pipeline {cfg.name!r}:", *validation_error_lines(err, hints=True)]
        lines.append("Fix these values (a trigger's params, or `shrinkflow run --set field=value`); "
                     "the schema lives in tasks/config.py.")
        raise ConfigError("\n".join(lines)) from None
    new.name = cfg.name
    if cfg._pipelines_file is not None:  # validation drops the private field; paths keep counting from the project
        resolve_project_paths(new, cfg._pipelines_file)
    return new


def run_config(pipeline: str, state: Mapping[str, Any], config_path: Any = None) -> PipelineConfig:
    """The pipeline's config as one run sees it: pipelines.yaml with the overrides its run.json records."""
    from tasks.config import load_pipeline

    return apply_overrides(load_pipeline(pipeline, config_path), state.get("overrides") or {})
