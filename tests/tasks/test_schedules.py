"""Schedules in pipelines.yaml: cron and presets checked at load time, Asset schedules on a model alias."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import load_pipelines
from tasks.errors import ConfigError
from tasks.schedules import AssetSchedule, model_alias_asset_uri

GOOD = ["0 2 * * *", "30 1 * * mon-fri", "*/15 * * * *", "0 0 1 */3 *", "@daily", "@hourly", "@weekly",
        "@monthly", "@quarterly", "@yearly", "@once"]
BAD = {
    "every night please": "3 fields, not 5",
    "61 * * * *": "not a valid cron expression",
    "0 25 * * *": "not a valid cron expression",
    "0 2 * * * *": "6 fields, not 5",
    "@midnight": "not one of the presets",
    "@continuous": "restart the pipeline",
}


def _write(tmp_path: Path, schedule_yaml: str) -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(f"pipelines:\n  p:\n    data: {{source: synthetic}}\n    model: {{name: resnet8}}\n"
                 f"    schedule: {schedule_yaml}\n")
    return p


@pytest.mark.parametrize("expr", GOOD)
def test_cron_and_presets_are_accepted_as_airflow_accepts_them(tmp_path: Path, expr: str) -> None:
    assert load_pipelines(_write(tmp_path, repr(expr)))["p"].schedule == expr
    if expr != "@once":  # Airflow's own parser takes what we take
        from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

        CronTriggerTimetable(expr, timezone="UTC").validate()


def test_no_schedule_means_manual_runs(tmp_path: Path) -> None:
    assert load_pipelines(_write(tmp_path, "null"))["p"].schedule is None


@pytest.mark.parametrize("expr", sorted(BAD))
def test_bad_schedule_names_field_value_and_examples(tmp_path: Path, expr: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_pipelines(_write(tmp_path, repr(expr)))
    msg = str(err.value)
    assert "pipelines.p.schedule" in msg and repr(expr) in msg and BAD[expr] in msg
    assert "'0 2 * * *'" in msg and "@daily" in msg and "model_alias" in msg  # what would be valid


def test_model_alias_schedule_becomes_an_asset(tmp_path: Path) -> None:
    sched = load_pipelines(_write(tmp_path, "{model_alias: 'models:/fashion-base@production'}"))["p"].schedule
    assert isinstance(sched, AssetSchedule)
    assert sched.name == "models:/fashion-base@production"
    assert sched.uri == "mlflow-model://fashion-base/production" == model_alias_asset_uri(sched.name)
    other = load_pipelines(_write(tmp_path, "{asset: 's3://bucket/fashion/'}"))["p"].schedule
    assert (other.name, other.uri) == ("s3://bucket/fashion/", "s3://bucket/fashion/")


@pytest.mark.parametrize(
    ("schedule", "fix"),
    [
        ("{model_alias: 'models:/fashion-base/3'}", "a version number never does"),
        ("{model_alias: 'fashion-base'}", "models:/<name>@<alias>"),
        ("{asset: 'airflow://x'}", "other than airflow"),
        ("{asset: 'no-scheme'}", "a URI with a scheme"),
        ("{}", "exactly one of model_alias"),
        ("{cron: '0 2 * * *'}", "cron: Extra inputs are not permitted"),
        ("42", "is a int"),
    ],
)
def test_bad_asset_schedules_say_the_fix(tmp_path: Path, schedule: str, fix: str) -> None:
    with pytest.raises(ConfigError, match="pipelines.p.schedule") as err:
        load_pipelines(_write(tmp_path, schedule))
    assert fix in str(err.value)
