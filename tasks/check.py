"""`shrinkflow check`: everything about a pipeline that is knowable without training, checked in seconds.

The pipelines file, the op configs and their order, the targets against the device registry, the
user's model (imports, builds, takes the data's shape, matches its weights), the data source, and the
services (study storage, MLflow server, RPC devices), each bounded in time. The first problem raises
the error a stage would have raised hours later, with the field and the fix. `shrinkflow run` and the
DAG's start task call it before the first stage.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, load_pipeline, pipelines_path, resolve_project_paths
from tasks.errors import ConfigError, DeviceError, ModelLoadError, ModelNotRegisteredError

# The stages apply a plan by phase (compress: structure ops; fine-tune: train ops; then post ops).
PHASES = ("structure", "train", "post")
WEIGHTS_URI = re.compile(r"^(models:/[^/@\s]+(@[A-Za-z0-9_.-]+|/\d+)|runs:/[0-9a-zA-Z]+/\S+)$")
TCP_TIMEOUT_S = 5.0


# A checked line that is no problem now but a condition the pipeline waits for (it cannot run by hand yet).
WAITING = "waiting: "


def check_pipeline(
    name: str,
    config_path: str | os.PathLike | None = None,
    *,
    workspace: str | os.PathLike | None = None,
    services: bool = True,
    allow_waiting: bool = False,
    overrides: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[str]:
    """Check one pipeline; returns the lines checked (each also passed to `echo`), raises on the first problem.

    services: False skips the network (study storage, MLflow server, RPC devices).
    allow_waiting: a condition the pipeline's schedule waits for (the registry alias it runs on, not yet
    registered) is a `WAITING` line instead of an error; `shrinkflow check` allows it, a run does not.
    """
    lines: list[str] = []

    def ok(line: str) -> None:
        lines.append(line)
        if echo is not None:
            echo(line)

    cfg = load_pipeline(name, config_path)
    if overrides:
        from tasks.overrides import apply_overrides

        source = cfg._pipelines_file
        cfg = apply_overrides(cfg, overrides)
        if cfg._pipelines_file is None and source is not None:  # re-validation drops the private field
            resolve_project_paths(cfg, source)
    ok(f"pipelines file {pipelines_path(config_path).resolve()}: pipeline {name!r} is valid")
    ok(_check_devices(cfg))
    if services:
        for line in _check_rpc_devices(cfg):
            ok(line)
    probe, line = _check_data(cfg)
    ok(line)
    model, line, base = _check_model(cfg, probe)
    ok(line)
    if base is not None:
        ok(f"weights: held by model {cfg.model.label()} (sha256 {base.sha256[:12]})")
    else:
        ok(_check_weights(cfg, model, workspace, config_path, allow_waiting))
    ok(_check_plan(cfg, model, probe))
    if services:
        from tasks.workspace import project_workspace

        ws = project_workspace(workspace, config_path)
        ok(_check_study_storage(cfg, ws))
        ok(_check_tracking(ws))
        ok(_check_artifacts(ws))
    return lines


def _check_artifacts(ws: Path) -> str:
    """With $SHRINKFLOW_ARTIFACTS, the object store takes a write and gives it back within seconds."""
    from tasks import object_store

    store = object_store.current()
    return store.check() if store is not None else f"workspace: local folders in {ws}"


def _where(cfg: PipelineConfig) -> str:
    return f"pipeline {cfg.name!r}"


def _check_devices(cfg: PipelineConfig) -> str:
    """targets and goal.device name devices of the registry; the toolchain each needs is installed."""
    from tasks.devices import load_devices, registry_of

    registry = registry_of(cfg)
    devices = load_devices(registry)
    known = ", ".join(sorted(devices)) or "(none)"
    for field, names in (("targets", cfg.targets), ("goal.device", [cfg.goal.device])):
        for n in names:
            if n not in devices:
                raise ConfigError(
                    f"{_where(cfg)}: {field}: unknown device {n!r}; {registry} declares: {known}. "
                    f"Use one of these in {field} or add the device to the registry."
                )
    from tasks.devices import get_device
    from tasks.engines import builds

    try:  # every target needs an engine among benchmark.engines
        builds(cfg.benchmark.engines, [devices[n] for n in cfg.targets], get_device("host", registry), int8_plan=False)
    except ConfigError as e:
        raise ConfigError(f"{_where(cfg)}: {e}") from None
    for n in cfg.targets:
        tool = _toolchain(devices[n])
        if tool is not None and shutil.which(tool[0]) is None:
            raise ConfigError(
                f"{_where(cfg)}: target {n!r} needs {tool[0]!r}, which is not on PATH; install it "
                f"(Debian: apt-get install {tool[1]}) or remove {n} from targets"
            )
    return f"targets {', '.join(cfg.targets)} and goal.device {cfg.goal.device}: declared in {registry}"


def _toolchain(device: Any) -> tuple[str, str] | None:
    """(program, Debian package) a target's build needs on this machine, as the compile stage picks it."""
    if device.is_fpga:
        return ("g++", "g++")  # the C simulation of the HLS project
    from tasks.engines.tvm_build import CROSS_COMPILER_PACKAGES, runs_on_host

    cc = device.cross_compiler
    if cc is None and not runs_on_host(device.target) and device.target.get("mtriple"):
        cc = f"{device.target['mtriple']}-gcc"
    return None if cc is None else (cc, CROSS_COMPILER_PACKAGES.get(cc, "the cross gcc for this target"))


def _check_rpc_devices(cfg: PipelineConfig) -> list[str]:
    """Each RPC target's server (or tracker) accepts a TCP connection."""
    from tasks.devices import load_devices, registry_of

    devices = load_devices(registry_of(cfg))
    lines = []
    for n in cfg.targets:
        rpc = devices[n].rpc
        if rpc is None or devices[n].is_fpga:
            continue
        try:
            socket.create_connection((rpc.host, rpc.port), timeout=TCP_TIMEOUT_S).close()
        except OSError as e:
            raise DeviceError(
                f"{_where(cfg)}: target {n!r}: its TVM RPC {'tracker' if rpc.key else 'server'} "
                f"{rpc.host}:{rpc.port} is unreachable ({e.strerror or e}). Start it (the emulated ARM device: "
                f"`make arm-device`), fix rpc: in the device registry, or remove {n} from targets"
            ) from None
        lines.append(f"device {n}: TVM RPC {rpc.host}:{rpc.port} reachable")
    return lines


def _check_data(cfg: PipelineConfig):
    from tasks.data.probe import probe_data

    probe = probe_data(cfg.data)
    shape = "x".join(map(str, probe.input_shape))
    return probe, f"data {cfg.data.source} ({probe.origin}): images {shape}, {probe.num_classes} classes"


def _check_model(cfg: PipelineConfig, probe: Any):
    """The model builds (zoo name, user factory, transformers config or folder, .pt2), takes the data's
    images and returns [N, classes]. A folder or .pt2 is loaded with its weights, as train_base loads it."""
    import torch

    from tasks.models.sources import load_base
    from tasks.models.user import arch_of, build_arch
    from tasks.stages.train_base import check_io

    m = cfg.model
    what = f"model {m.label()}"
    torch.manual_seed(cfg.train.seed)
    base = None
    if m.brings_weights():
        model, base = load_base(m, in_channels=probe.input_shape[0], num_classes=probe.num_classes)
    else:
        model = build_arch(arch_of(m), in_channels=probe.input_shape[0], num_classes=probe.num_classes)
    try:
        check_io(model, probe.input_shape, probe.num_classes, what)
    except ModelLoadError as e:
        raise ModelLoadError(f"{_where(cfg)}: {e}{_size_hint(cfg, probe.input_shape)}") from None
    n_params = sum(p.numel() for p in model.parameters())
    return model, f"{what}: builds ({n_params:,} parameters), takes [N, {', '.join(map(str, probe.input_shape))}]" \
                  f" and returns [N, {probe.num_classes}]", base


def _size_hint(cfg: PipelineConfig, shape: list[int]) -> str:
    """For a transformers model whose config's image_size is not the data's: say so, and what to change."""
    from tasks.models.user import arch_of

    if cfg.model.transformers is None:
        return ""
    fields = arch_of(cfg.model)["transformers"]
    size = fields.get("image_size")
    sizes = list(size) if isinstance(size, list | tuple) else [size, size]
    if size is None or sizes == list(shape[1:]):
        return ""
    return (f" Its config has image_size={size} (patch_size={fields.get('patch_size', '?')}) but the data's images "
            f"are {shape[1]}x{shape[2]}: set image_size (and a patch_size that divides it) in model.transformers, "
            "or resize the data")


def _check_weights(cfg: PipelineConfig, model: Any, workspace: str | os.PathLike | None,
                   config_path: str | os.PathLike | None, allow_waiting: bool = False) -> str:
    """model.weights: a file whose state_dict fits the model, or a well-formed MLflow URI."""
    from tasks.models.checkpoint import load_weights_strict
    from tasks.models.user import read_weights

    weights = cfg.model.weights
    if not weights:
        return "weights: none (train_base trains the model)"
    if weights.startswith(("models:/", "runs:/")):
        if not WEIGHTS_URI.match(weights):
            raise ModelLoadError(
                f"{_where(cfg)}: model.weights {weights!r} is not a valid MLflow URI; write "
                "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<path>"
            )
        return _check_weights_uri(cfg, model, weights, workspace, config_path, allow_waiting)
    load_weights_strict(model, read_weights(weights), source=weights)
    return f"weights {weights}: match the model"


def _check_weights_uri(cfg: PipelineConfig, model: Any, uri: str, workspace: str | os.PathLike | None,
                       config_path: str | os.PathLike | None, allow_waiting: bool = False) -> str:
    """Weights held by MLflow: resolved (alias -> version, downloaded once to the workspace cache) and matched."""
    from tasks.models.checkpoint import load_weights_strict
    from tasks.models.sources import resolve_base
    from tasks.workspace import project_workspace

    try:
        base = resolve_base(cfg.model, project_workspace(workspace, config_path))
    except ModelNotRegisteredError as e:
        schedule = cfg.schedule
        if not allow_waiting or getattr(schedule, "model_alias", None) != uri:
            raise
        # the pipeline runs when that alias moves: before its producer registers it, nothing is wrong
        return (f"{WAITING}weights {uri} are not registered yet; this pipeline is scheduled on that alias "
                f"(schedule.model_alias), so its producer's registration starts it. {e}")
    load_weights_strict(model, base.state_dict(), source=base.resolved)
    return f"weights {uri} -> {base.resolved} (sha256 {base.sha256[:12]}): match the model"


def _check_plan(cfg: PipelineConfig, model: Any, probe: Any) -> str:
    """The plan's op configs, built as the search (n_trials > 0) or compress stage builds them, in phase order;
    for a frontier (goal.frontier), as each point's run builds them (goal.speedup = the point)."""
    if not cfg.goal.frontier:
        return _check_one_plan(cfg, model, probe)
    line = ""
    for point in cfg.goal.frontier:
        goal = cfg.goal.model_copy(update={"speedup": point, "frontier": None})
        line = _check_one_plan(cfg.model_copy(update={"goal": goal}), model, probe)
    return f"{line}; at each frontier point ({', '.join(f'{p:g}x' for p in cfg.goal.frontier)})"


def _check_one_plan(cfg: PipelineConfig, model: Any, probe: Any) -> str:
    import torch

    if cfg.model.exported is not None:
        _check_exported_plan(cfg)
    if cfg.search.n_trials > 0:
        from tasks.search.space import SearchSpace

        space = SearchSpace(cfg, model, torch.zeros(1, *probe.input_shape), None)
        plan, _ = space.build(space.defaults())
        how = f"searched over {len(space.searched)} parameters"
    else:
        from tasks.plan import plan_from_config

        plan = plan_from_config(cfg)
        how = "as written (search.n_trials: 0)"
    check_plan_order(cfg, [op for op in plan if op.phase != "finetune"])
    ops = " -> ".join(op.op for op in plan if op.phase != "finetune") or "(no ops)"
    distill = ", distillation in fine-tuning" if any(op.phase == "finetune" for op in plan) else ""
    return f"compression plan: {ops}{distill}; {how}"


def _check_exported_plan(cfg: PipelineConfig) -> None:
    """A .pt2 graph has no layers to prune, factorise, sparsify or quantize: only fine-tune ops apply."""
    import compression_ops  # noqa: F401  (registers every op config)
    from compression_ops.base import registered_configs
    from tasks.models.exported import STRUCTURE_FREE_PHASES

    configs = registered_configs()
    for i, entry in enumerate(cfg.compression.plan):
        op = configs.get(entry.get("op"))
        if op is not None and op.phase not in STRUCTURE_FREE_PHASES:
            raise ConfigError(
                f"{_where(cfg)}: compression.plan[{i}] ({op.op}) cannot apply to model.exported: a torch.export "
                "graph has no Conv2d/Linear modules to prune, factorise, sparsify or quantize, and its reshapes "
                "are fixed to the traced shapes. Set compression.plan: [] (distillation, set under finetune.distill, "
                "still applies; the default plan prunes), or give the model's code and weights (model.factory + "
                "model.weights) to compress it"
            )


def check_plan_order(cfg: PipelineConfig, ops: list[Any]) -> None:
    """Ops listed in the order the stages apply them: structure, then train, then post-training ops."""
    for i in range(1, len(ops)):
        prev, op = ops[i - 1], ops[i]
        if PHASES.index(op.phase) < PHASES.index(prev.phase):
            raise ConfigError(
                f"{_where(cfg)}: compression.plan[{i}] ({op.op}, a {op.phase} op) comes after plan[{i - 1}] "
                f"({prev.op}, a {prev.phase} op), but the stages apply {', then '.join(PHASES)} ops. "
                f"Move {op.op} before {prev.op} in compression.plan."
            )


def _check_study_storage(cfg: PipelineConfig, ws: Path) -> str:
    """A server study storage (search.storage or $SHRINKFLOW_OPTUNA_STORAGE) answers within ~10 s."""
    from tasks.services import check_database

    if cfg.search.n_trials == 0:
        return "study storage: not used (search.n_trials: 0)"
    url = cfg.search.storage or os.environ.get("SHRINKFLOW_OPTUNA_STORAGE")
    if cfg.search.workers > 1 and (not url or url.startswith("sqlite")):
        raise ConfigError(
            f"{_where(cfg)}: search.workers={cfg.search.workers} share one study, and the storage is SQLite, "
            "which workers on other machines cannot reach: set search.storage (or $SHRINKFLOW_OPTUNA_STORAGE) "
            "to postgresql+psycopg2://user@host:5432/db"
        )
    if not url:
        return f"study storage: SQLite in the workspace ({ws / 'optuna.db'})"
    field = "search.storage" if cfg.search.storage else "$SHRINKFLOW_OPTUNA_STORAGE"
    if url.startswith("sqlite"):
        return f"study storage ({field}): {url}"
    return check_database(
        url, f"Optuna study storage ({field})",
        f"Start the database, or point {field} at one that runs (e.g. "
        "postgresql+psycopg2://postgres@127.0.0.1:5432/test); without either, the study lives in SQLite "
        "in the workspace",
    )


def _check_tracking(ws: Path) -> str:
    """$MLFLOW_TRACKING_URI, when it names a server or a database, answers within ~10 s."""
    from tasks.services import check_tracking

    line = check_tracking(os.environ.get("MLFLOW_TRACKING_URI"))
    return line if os.environ.get("MLFLOW_TRACKING_URI") else f"{line} ({ws / 'mlflow.db'})"
