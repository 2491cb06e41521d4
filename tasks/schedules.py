"""When a pipeline runs: an Airflow cron expression or preset, or an Airflow Asset such as a model alias.

Validated here, with croniter (the parser Airflow's own timetables use), so a bad schedule is a
ConfigError at load time rather than a DAG that never runs. No Airflow import: tasks/ stays
usable without it; dags/ turns an AssetSchedule into `schedule=[Asset(...)]`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Airflow's presets (airflow.sdk.definitions.timetables._cron.CRON_PRESETS, plus @once). Not
# @continuous: a pipeline would start again the moment it finished.
PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "@once")
EXAMPLES = (
    "'0 2 * * *' (02:00 UTC every night), '30 1 * * mon-fri', '@daily', '@weekly', "
    "null (manual runs only), or {model_alias: 'models:/<name>@<alias>'} (run when that alias moves)"
)
MODEL_ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[A-Za-z0-9_-]+)")
_URI_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://\S+")
# The Asset URI an MLflow model alias stands for; one helper, so producer and consumer DAGs agree.
MODEL_ASSET_SCHEME = "mlflow-model"


def check_cron(value: str) -> str:
    """The schedule string if it is a preset or a 5-field cron expression; ValueError naming the fix."""
    text = value.strip()
    if text in PRESETS:
        return text
    hint = f"give a 5-field cron expression (minute hour day-of-month month day-of-week) or a preset; e.g. {EXAMPLES}"
    if text.startswith("@"):
        extra = " (@continuous would restart the pipeline as soon as it ends)" if text == "@continuous" else ""
        raise ValueError(f"schedule {value!r} is not one of the presets {', '.join(PRESETS)}{extra}; {hint}")
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"schedule {value!r} is not a cron expression ({len(fields)} fields, not 5); {hint}")
    from croniter import croniter

    try:
        croniter(text)
    except ValueError as e:  # croniter's errors subclass ValueError
        raise ValueError(f"schedule {value!r} is not a valid cron expression ({e}); {hint}") from None
    return text


class AssetSchedule(BaseModel):
    """Run when an Airflow Asset is updated: a registered model's alias, or any Asset URI."""

    model_config = ConfigDict(extra="forbid")

    model_alias: str | None = Field(
        None, description="models:/<name>@<alias>: run when a DAG (or the REST API) reports that alias moved"
    )
    asset: str | None = Field(None, description="any Airflow Asset URI, e.g. s3://bucket/fashion/ (scheme required)")

    @model_validator(mode="after")
    def _one(self) -> AssetSchedule:
        if (self.model_alias is None) == (self.asset is None):
            raise ValueError("give exactly one of model_alias: 'models:/<name>@<alias>' or asset: '<scheme>://...'")
        if self.model_alias is not None and not MODEL_ALIAS.fullmatch(self.model_alias):
            raise ValueError(
                f"model_alias {self.model_alias!r} must look like 'models:/<name>@<alias>', e.g. "
                "'models:/fashion-base@production' (an alias moves when a new version is promoted; a version number never does)"
            )
        if self.asset is not None:
            match = _URI_SCHEME.fullmatch(self.asset)
            if match is None or match["scheme"].lower() == "airflow":
                raise ValueError(
                    f"asset {self.asset!r} must be a URI with a scheme other than airflow (reserved), "
                    "e.g. 's3://bucket/fashion/' or 'file:///data/fashion'"
                )
        return self

    @property
    def name(self) -> str:
        """The Asset's name, shown in the Airflow UI: the model URI, or the asset URI."""
        return self.model_alias or self.asset or ""

    @property
    def uri(self) -> str:
        if self.model_alias is not None:
            return model_alias_asset_uri(self.model_alias)
        return self.asset or ""


def model_alias_asset_uri(model_uri: str) -> str:
    """The Asset URI of `models:/<name>@<alias>`: mlflow-model://<name>/<alias> (both URL-quoted)."""
    match = MODEL_ALIAS.fullmatch(model_uri)
    if match is None:
        raise ValueError(f"{model_uri!r} is not 'models:/<name>@<alias>'")
    return f"{MODEL_ASSET_SCHEME}://{quote(match['name'], safe='')}/{quote(match['alias'], safe='')}"


def parse_schedule(value: Any) -> str | AssetSchedule | None:
    """A schedule as pipelines.yaml gives it (None, a string, or a mapping), validated; ValueError otherwise."""
    if value is None or isinstance(value, AssetSchedule):
        return value
    if isinstance(value, str):
        return check_cron(value)
    if isinstance(value, dict):
        try:
            return AssetSchedule.model_validate(value)
        except ValidationError as err:
            msgs = "; ".join(
                ".".join(str(p) for p in e["loc"]) + ": " * bool(e["loc"]) + e["msg"].removeprefix("Value error, ")
                for e in err.errors()
            )
            raise ValueError(f"{msgs}. Valid schedules: {EXAMPLES}") from None
    raise ValueError(f"schedule {value!r} is a {type(value).__name__}; valid schedules: {EXAMPLES}")
