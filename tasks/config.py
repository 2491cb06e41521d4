"""The schema of pipelines.yaml: what a user declares, validated before any work starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import ConfigError, UnknownPipelineError
from tasks.schedules import AssetSchedule, parse_schedule

DEFAULT_PIPELINES_FILE = "pipelines.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    source: Literal["fashion_mnist", "digits", "image_folder", "synthetic"]
    path: str | None = Field(None, description="folder for image_folder / fashion_mnist")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="only for sources without a test split")
    train_subset: int | None = Field(None, gt=0, description="use only this many training images")
    image_size: int | None = Field(None, gt=0, description="image_folder: resize to this square size")
    grayscale: bool = True
    num_classes: int = Field(10, gt=1, description="synthetic only")
    num_samples: int = Field(600, gt=0, description="synthetic only")
    seed: int = 0


class ModelConfig(_Strict):
    name: str | None = Field(None, description="a model from the zoo, e.g. resnet8 or mobilenet_tiny")
    factory: str | None = Field(None, description="a user model as 'module:function'")
    transformers: dict[str, Any] | str | None = Field(
        None, description="a Hugging Face transformers image classifier: by config, {model_type: vit, ...its "
        "fields} (num_channels and num_labels follow the data), or a local folder written by save_pretrained "
        "(its weights are the base; never downloaded from the hub)",
    )
    exported: str | None = Field(
        None, description="a torch.export archive (.pt2, torch.export.save) with a dynamic batch dimension; "
        "only distillation applies to it (see tasks/models/exported.py)",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(
        None, description="the base's weights: a .pt state_dict or .safetensors file, models:/<name>@<alias>, "
        "models:/<name>/<version> or runs:/<run_id>/<path> (MLflow); the architecture comes from name/factory",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in ("name", "factory", "transformers", "exported") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'name' (a zoo model), 'factory' ('module:function'), 'transformers' "
                f"(a transformers config or a save_pretrained folder) or 'exported' (a .pt2 file); got {given or 'none'}"
            )
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        if self.brings_weights():
            what = "model.exported" if self.exported else "model.transformers (a folder)"
            if self.weights:
                raise ValueError(f"{what} holds its own weights: drop model.weights (or give the transformers config "
                                 "as fields, or the model's factory, to load other weights into it)")
            if self.kwargs:
                raise ValueError(f"model.kwargs do not apply to {what}: the file fixes the architecture; drop them")
        return self

    def brings_weights(self) -> bool:
        """A source that holds the base weights itself (a transformers folder, a .pt2)."""
        return isinstance(self.transformers, str) or self.exported is not None

    def arch(self) -> dict[str, Any]:
        """The model's source as written (name / factory / transformers / exported) and its kwargs.
        tasks.models.user.arch_of turns a folder or a .pt2 into the record a checkpoint keeps."""
        if self.transformers is not None:
            fields = self.transformers if isinstance(self.transformers, str) else dict(self.transformers)
            return {"transformers": fields, "kwargs": self.kwargs}
        if self.exported is not None:
            return {"exported": self.exported, "kwargs": self.kwargs}
        return {"name": self.name, "kwargs": self.kwargs} if self.name else {"factory": self.factory, "kwargs": self.kwargs}

    def label(self) -> str:
        """How messages name the model."""
        if isinstance(self.transformers, str):
            return f"transformers folder {self.transformers}"
        if self.transformers is not None:
            return f"transformers {self.transformers.get('model_type', '?')}"
        if self.exported is not None:
            return f"exported {self.exported}"
        return self.name or self.factory


Optimizer = Literal["sgd", "adamw"]


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.1, gt=0)
    optimizer: Optimizer = Field(
        "sgd", description="sgd (Nesterov momentum; convnets) or adamw (transformers, e.g. lr 1e-3)"
    )
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = False
    seed: int = 0


class GoalConfig(_Strict):
    """What the compressed model must reach; any subset of the cost goals, plus the accuracy limit."""

    speedup: float | None = Field(None, gt=1, description="how many times faster (metric: latency) or fewer MACs")
    metric: Literal["macs", "latency"] = Field(
        "latency", description="how speedup is measured: latency measured (PyTorch eager, batch 1), or MACs counted"
    )
    size_mb: float | None = Field(None, gt=0, description="packed model size at most this many MB (1e6 bytes)")
    latency_ms: float | None = Field(None, gt=0, description="batch-1 latency at most this many ms (PyTorch eager)")
    max_accuracy_drop: float = Field(0.5, ge=0, description="in accuracy points (percent)")
    device: str = Field(
        "host",
        description="the device (infra/devices.yaml) whose latency the search costs: figures the benchmark "
        "measured there for an architecture are used; otherwise host: PyTorch eager here, RPC device: TVM on it",
    )
    frontier: list[Annotated[float, Field(gt=1)]] | None = Field(
        None,
        description="several speedups (in `metric`) from one run, e.g. [2, 3, 5]: one compressed model per point, "
        "each compressed (searched when the pipeline searches), fine-tuned, compiled, measured and registered "
        "as its own model "
        "(shrinkflow-<pipeline>-<point>x), and a frontier plot of accuracy against MACs and measured latency; "
        "instead of speedup",
    )

    @field_validator("frontier")
    @classmethod
    def _frontier_points(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not 1 <= len(v) <= 8:
            raise ValueError(f"give 1 to 8 frontier points (speedups), e.g. [2, 3, 5]; got {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"frontier points {v} repeat a value; give each speedup once")
        return sorted(v)

    @model_validator(mode="after")
    def _frontier_or_speedup(self) -> GoalConfig:
        if self.frontier is not None and self.speedup is not None:
            raise ValueError(
                f"give goal.speedup ({self.speedup}) or goal.frontier ({self.frontier}), not both: a frontier run "
                "sets each point's speedup itself"
            )
        return self


class DistillConfig(_Strict):
    enabled: bool = True
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KD term; 1-alpha on the labels")
    hint_weight: float = Field(0.0, ge=0, description="weight of the penultimate-feature (hint) loss; 0: off")
    attention_weight: float = Field(
        0.0, ge=0, le=1e5,
        description="weight of attention transfer at every resolution stage's end (1000 in the paper); 0: off")
    alpha_decay: bool = Field(
        False, description="the KD weight falls linearly from alpha to 0 over the fine-tune (labels alone at the end)")


class SensitivityConfig(_Strict):
    enabled: bool | Literal["auto"] = Field(
        "auto", description="auto: scan when the search runs (it shapes the per-group ratios and the first trial); "
        "true: always (for the plot); false: never",
    )
    prune_ratios: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    weight_bits: list[Annotated[int, Field(ge=1, le=8)]] = Field(default_factory=lambda: [8, 4, 2])
    val_images: int = Field(2000, gt=0, description="validation images per evaluation at most (a subset keeps it fast)")
    budget_s: float = Field(
        60.0, gt=0, description="about how long the scan may take: deeper models are scanned on fewer images "
        "(down to 250 per evaluation)",
    )


class CompressionConfig(_Strict):
    plan: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"op": "channel_prune"}],
        description="ops applied in order, each {op: name, ...its fields}; see compression_ops",
    )
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)

    @field_validator("plan")
    @classmethod
    def _ops_named(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Field values are checked by the op configs themselves when the compress stage builds the plan
        # (importing them here would pull torch into every DAG parse).
        for i, item in enumerate(v):
            if not isinstance(item.get("op"), str):
                raise ValueError(f"plan[{i}] needs an 'op' name, e.g. {{op: channel_prune, ratio: 0.3}}")
        return v


class FinetuneConfig(_Strict):
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.02, gt=0)
    optimizer: Optimizer | None = Field(None, description="sgd or adamw; none: train.optimizer")
    weight_decay: float = Field(5e-4, ge=0)
    distill: DistillConfig = Field(default_factory=DistillConfig)


SEARCH_WORKERS_ENV = "SHRINKFLOW_SEARCH_WORKERS"


def _env_count(name: str, default: int = 1) -> int:
    """A whole number >= 1 from the environment (a deployment's default), or `default` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"${name}={raw!r} is not a whole number of at least 1; unset it or give e.g. 2")
    return int(raw)


class SearchConfig(_Strict):
    """The Optuna search over the plan's ops (tasks/search). n_trials 0 applies the plan as written."""

    n_trials: int = Field(0, ge=0, description="trials in all (over every worker); 0: no search")
    sampler: Literal["tpe", "random", "nsga2", "motpe"] = Field(
        "tpe", description="tpe/random: most accurate plan meeting the goal; nsga2/motpe: accuracy vs cost Pareto front"
    )
    cost: Literal["auto", "macs", "latency", "size"] = Field(
        "auto", description="the second objective of nsga2/motpe; auto follows the goal"
    )
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="stops bad trials early (single objective)")
    trial_epochs: int = Field(2, ge=1, description="fine-tune epochs per trial (the pruner's resource)")
    train_subset: int | None = Field(None, gt=0, description="training images per trial epoch (None: all)")
    val_images: int = Field(2000, gt=0, description="validation images each trial is scored on")
    prune_shape: Literal["per_layer", "sensitivity"] = Field(
        "per_layer", description="per_layer: one multiplier per prunable group; sensitivity: one exponent over the scan"
    )
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="pin or narrow parameters: name: value (pinned), [low, high] (range), {choices: [...]}",
    )
    warm_start: bool = Field(True, description="enqueue the sensitivity-shaped plan and the previous run's best first")
    workers: int = Field(
        default_factory=lambda: _env_count(SEARCH_WORKERS_ENV), ge=1,
        description="Airflow mapped worker tasks sharing the study (needs a server storage); default "
        "$SHRINKFLOW_SEARCH_WORKERS (a deployment's number of workers) or 1",
    )
    storage: str | None = Field(
        None, description="Optuna storage URL; default $SHRINKFLOW_OPTUNA_STORAGE or SQLite in the workspace"
    )
    timeout_minutes: float | None = Field(None, gt=0, description="stop starting trials after this long (per worker)")
    pick: int | None = Field(None, ge=0, description="use this trial number instead of the automatic choice")
    heartbeat_seconds: int = Field(10, ge=1, description="a trial silent for 3x this long is failed and queued again")
    seed: int = 0

    @model_validator(mode="after")
    def _workers_need_server(self) -> SearchConfig:
        if self.workers > 1 and self.storage is not None and self.storage.startswith("sqlite"):
            raise ValueError(
                f"workers={self.workers} share one study: SQLite cannot take concurrent writers; "
                "set search.storage to a server, e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/test"
            )
        return self


class BenchmarkConfig(_Strict):
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 32])
    warmup: int = Field(20, ge=0)
    repeat: int = Field(100, gt=0)
    threads: int = Field(2, gt=0)
    engines: list[str] | None = Field(
        None,
        description="engines to build and time (tasks/engines/__init__.py: pytorch, onnxruntime, onnxruntime_int8, "
        "tvm, tvm_rpc, fpga_hls); none: every registered engine that serves a target",
    )
    remote_repeat: int = Field(10, gt=0, description="timing samples on an RPC device (its p90 is over these)")
    remote_number: int = Field(3, gt=0, description="calls averaged per timing sample on an RPC device")
    remote_check_images: int = Field(
        1000, gt=0, description="test images checked on an RPC device and in an FPGA C simulation (all on this machine)"
    )

    @field_validator("engines")
    @classmethod
    def _registered(cls, v: list[str] | None) -> list[str] | None:
        from tasks.engines import ENGINES  # light: the registry, not the engines

        unknown = [e for e in v or [] if e not in ENGINES]
        if unknown:
            raise ValueError(f"unknown engine(s) {unknown}; registered engines: {', '.join(ENGINES)}")
        return v


class TuningConfig(_Strict):
    budget_s: float = Field(
        120.0, ge=0, description="seconds to tune the TVM schedule per model and host target; 0: reuse the database only"
    )
    database: str | None = Field(
        None, description="tuning database file; none: .shrinkflow/tuning/<device>.json (DVC-tracked, reused nightly)"
    )


class CompileConfig(_Strict):
    pad_channels: bool = Field(
        True, description="widen pruned channel counts to whole vector registers before TVM compiles (exact)"
    )
    tuning: TuningConfig = Field(default_factory=TuningConfig)


class PromotionConfig(_Strict):
    """The champion/challenger gate: both models scored on this run's test split and timed side by side."""

    require_goal: bool = Field(True, description="promote only a challenger that met the run's goal")
    accuracy_tolerance: float = Field(
        0.1, ge=0, description="points (percent) the challenger's test accuracy may fall below the champion's"
    )
    cost: Literal["latency", "macs", "size", "none"] = Field(
        "latency",
        description="the cost that must be no worse than the champion's: latency (deployed engine on the "
        "host, timed interleaved), macs (per image), size (bytes of the deployed artifact), or none",
    )
    latency_tolerance: float = Field(
        0.1, ge=0, lt=1, description="timing noise allowed: latency counts as no worse up to champion x (1 + this)"
    )
    latency_batch: int = Field(1, gt=0, description="batch size the two models are timed at")
    warmup: int = Field(10, ge=0, description="untimed calls per model before timing")
    repeat: int = Field(50, gt=0, description="timed calls per model (interleaved)")


class PipelineConfig(_Strict):
    name: str = ""
    description: str = ""
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    goal: GoalConfig = Field(default_factory=GoalConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    targets: list[str] = Field(default_factory=lambda: ["host"])
    compile: CompileConfig = Field(default_factory=CompileConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    schedule: str | AssetSchedule | None = Field(
        None,
        description="a cron expression or preset ('0 2 * * *', '@daily'), {model_alias: 'models:/<name>@<alias>'} "
        "or {asset: '<uri>'} (an Airflow Asset); none: manual runs only",
    )
    tags: list[str] = Field(default_factory=list)
    # The file this pipeline was read from (set by load_pipelines): its folder is the project.
    _pipelines_file: Path | None = PrivateAttr(None)

    @field_validator("schedule", mode="before")
    @classmethod
    def _valid_schedule(cls, v: Any) -> str | AssetSchedule | None:
        return parse_schedule(v)

    @field_validator("targets")
    @classmethod
    def _some_target(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one target device (see infra/devices.yaml), e.g. [host]")
        return v


class PipelinesFile(_Strict):
    pipelines: dict[str, PipelineConfig]

    @model_validator(mode="after")
    def _names(self) -> PipelinesFile:
        for name, cfg in self.pipelines.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"pipeline name {name!r}: use letters, digits, '_' and '-' only")
            cfg.name = name
        return self


def pipelines_path(path: str | os.PathLike | None = None) -> Path:
    """The pipelines file: the argument, $SHRINKFLOW_PIPELINES, or ./pipelines.yaml."""
    return Path(path or os.environ.get("SHRINKFLOW_PIPELINES") or DEFAULT_PIPELINES_FILE)


def read_validated_yaml(path: Path, schema: type[BaseModel], key: str, what: str, env_var: str) -> BaseModel:
    """Read a YAML file with one top-level `key` and validate it against `schema`.

    Every failure is a ConfigError naming the file and the fix: missing file, YAML syntax (with line
    and column), wrong top level, or each invalid field with its path and what was expected.
    """
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found: run from the project folder or set {env_var}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}. Fix the syntax there.") from e
    if not isinstance(raw, dict) or key not in raw:
        raise ConfigError(f"{path} must be a mapping with a top-level '{key}:' key")
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path} is not a valid {what}:", *validation_error_lines(err)]
        lines.append(f"Fix these fields; the schema lives in {schema.__module__.replace('.', '/')}.py.")
        raise ConfigError("\n".join(lines)) from err


def validation_error_lines(err: ValidationError, hints: bool = False) -> list[str]:
    """One line per invalid field: its dotted path, what is wrong, the value given (and, with hints, the field's help)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        # Our own validators' messages already say the fix; pydantic's built-in ones get the field's help.
        hint = _field_hint(e["loc"]) if hints and e["type"] != "value_error" else ""
        lines.append(f"  - {loc}: {e['msg']}{shown}{hint}")
    return lines


def _field_hint(loc: tuple) -> str:
    """What the field at `loc` means (its description), or the fields its section does have."""
    model: Any = PipelineConfig
    for i, part in enumerate(loc):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return ""
        if part not in fields:
            return f"; {'.'.join(map(str, loc[:i])) or 'the pipeline'} has: {', '.join(fields)}"
        info = fields[part]
        model = info.annotation
        if i == len(loc) - 1:
            return f"; {loc[-1]}: {info.description}" if info.description else ""
    return ""


def project_dir(cfg: PipelineConfig | None = None, path: str | os.PathLike | None = None) -> Path:
    """The project: the folder of the pipeline's file (or of `path`, $SHRINKFLOW_PIPELINES, ./pipelines.yaml).

    Relative paths in the file and the defaults (workspace, device registry) count from here, not the cwd.
    """
    source = cfg._pipelines_file if cfg is not None and cfg._pipelines_file is not None else pipelines_path(path)
    return Path(source).resolve().parent


def _from_project(value: str | None, project: Path) -> str | None:
    """A relative file path made absolute against the project; URIs and absolute paths stay as written."""
    if not value or "://" in value or value.startswith(("models:/", "runs:/")):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else project / p)


def resolve_project_paths(cfg: PipelineConfig, pipelines_file: Path) -> PipelineConfig:
    """Point the pipeline's relative paths (data, weights, tuning database, SQLite study) at its project."""
    project = pipelines_file.resolve().parent
    cfg._pipelines_file = pipelines_file.resolve()
    cfg.data.path = _from_project(cfg.data.path, project)
    cfg.model.weights = _from_project(cfg.model.weights, project)
    cfg.model.exported = _from_project(cfg.model.exported, project)
    if isinstance(cfg.model.transformers, str):
        cfg.model.transformers = _from_project(cfg.model.transformers, project)
    cfg.compile.tuning.database = _from_project(cfg.compile.tuning.database, project)
    storage = cfg.search.storage
    if storage and storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        db = storage.removeprefix("sqlite:///")
        if db and db != ":memory:":
            cfg.search.storage = f"sqlite:///{_from_project(db, project)}"
    return cfg


def load_pipelines(path: str | os.PathLike | None = None) -> dict[str, PipelineConfig]:
    """Read and validate every pipeline in the file; relative paths in it count from its folder."""
    source = pipelines_path(path)
    file = read_validated_yaml(source, PipelinesFile, "pipelines", "pipelines file", "SHRINKFLOW_PIPELINES")
    pipelines: dict[str, PipelineConfig] = file.pipelines  # type: ignore[attr-defined]
    for cfg in pipelines.values():
        resolve_project_paths(cfg, source)
    return pipelines


def load_pipeline(name: str, path: str | os.PathLike | None = None) -> PipelineConfig:
    """One pipeline by name, with a clear error listing the known names."""
    pipelines = load_pipelines(path)
    if name not in pipelines:
        known = ", ".join(sorted(pipelines)) or "(none)"
        raise UnknownPipelineError(
            f"unknown pipeline {name!r}; {pipelines_path(path)} declares: {known}. "
            "Pick one of these or add it to the file."
        )
    return pipelines[name]

