"""Where a base model's weights come from: a file, the MLflow registry or an MLflow run, behind one
`resolve_base(model_cfg)` and one `load_base(model_cfg, ...)`; or the model source itself (a
transformers folder, a .pt2), which holds them (`own_weights`).

`model.weights` in pipelines.yaml names the weights; the architecture comes from `model.name`,
`model.factory` or a transformers config. Each source is a resolver registered by URI scheme (`register_source`), so a new
one (Hugging Face, `.pt2`) is one module and one registration. A resolver pins the URI (an alias
becomes a version), fetches the artifact into the workspace cache, and hashes the weights' content,
so lineage says exactly which weights a run started from, whatever container they came in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tasks.errors import ModelLoadError

if TYPE_CHECKING:
    from tasks.config import ModelConfig

# Files that hold a state_dict inside a folder artifact (a pickled whole module is not one).
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass
class ResolvedBase:
    """Weights pinned to one immutable location, with their content hash."""

    uri: str  # as written in model.weights
    resolved: str  # pinned: models:/name/3, runs:/id/path, or an absolute file path
    sha256: str  # state_dict_sha256 of the weights
    path: Path  # the local file or folder holding them (the workspace cache for MLflow sources)
    source: str  # the scheme that resolved it: file, models, runs
    version: str | None = None  # registry version
    run_id: str | None = None  # the MLflow run that produced the artifact
    arch: dict[str, Any] | None = None  # the architecture the registry records, if any
    _state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights, read once from `path`."""
        if self._state is None:
            self._state = read_artifact(self.path, self.uri)
        return self._state

    def record(self) -> dict[str, Any]:
        """What lineage keeps (base.json, run.json)."""
        return {"uri": self.uri, "resolved": self.resolved, "version": self.version, "run_id": self.run_id,
                "sha256": self.sha256, "source": self.source, "path": str(self.path)}

    def tags(self) -> dict[str, str]:
        """MLflow tags for the stage's run and the pipeline's parent run."""
        rec = {k: self.record()[k] for k in ("uri", "resolved", "version", "run_id", "sha256")}
        return {f"base_model.{k}": str(v) for k, v in rec.items() if v is not None}


Resolver = Callable[[str, Path, str | None], ResolvedBase]
SOURCES: dict[str, Resolver] = {}


def register_source(scheme: str) -> Callable[[Resolver], Resolver]:
    """Decorator: resolver(uri, workspace_root, tracking_uri) -> ResolvedBase for URIs `<scheme>:/...`."""

    def deco(fn: Resolver) -> Resolver:
        SOURCES[scheme] = fn
        return fn

    return deco


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash over sorted names, dtypes, shapes and bytes: the same for the same weights in any container."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scheme_of(uri: str) -> str:
    """The source a weights URI belongs to: models, runs, or file (a plain path, or file://)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/", uri)
    if m is None or len(m.group(1)) == 1:  # no scheme, or a Windows drive letter
        return "file"
    return m.group(1).lower()


def resolve_weights(uri: str, workspace: str | Path | None = None, *, tracking_uri: str | None = None) -> ResolvedBase:
    """Resolve a weights URI (path, models:/, runs:/) against the workspace's MLflow (or `tracking_uri`)."""
    from tasks.workspace import workspace_root

    _load_builtin()
    scheme = scheme_of(uri)
    if scheme not in SOURCES:
        raise ModelLoadError(
            f"model.weights {uri!r}: unsupported scheme {scheme!r}; give a file path, "
            "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run_id>/<artifact path>"
        )
    return SOURCES[scheme](uri, workspace_root(workspace), tracking_uri)


def resolve_base(model_cfg: ModelConfig, workspace: str | Path | None = None, *,
                 tracking_uri: str | None = None) -> ResolvedBase:
    """The pipeline's base weights (model.weights), pinned and hashed."""
    if not model_cfg.weights:
        raise ModelLoadError("model.weights is not set: there are no base weights to resolve (the base is trained)")
    return resolve_weights(model_cfg.weights, workspace, tracking_uri=tracking_uri)


def load_base(model_cfg: ModelConfig, *, in_channels: int, num_classes: int, workspace: str | Path | None = None,
              tracking_uri: str | None = None) -> tuple[nn.Module, ResolvedBase | None]:
    """Build the architecture; load model.weights into it strictly if given. None: the base is to be trained."""
    from tasks.models.checkpoint import load_weights_strict
    from tasks.models.user import build_arch

    arch = model_cfg.arch()
    model = build_arch(arch, in_channels=in_channels, num_classes=num_classes)
    if model_cfg.brings_weights():
        return model, own_weights(model_cfg, model)
    if not model_cfg.weights:
        return model, None
    base = resolve_base(model_cfg, workspace, tracking_uri=tracking_uri)
    source = base.uri if base.resolved == base.uri else f"{base.uri} ({base.resolved})"
    try:
        load_weights_strict(model, base.state_dict(), source=source)
    except ModelLoadError as e:
        if base.arch and _arch_key(base.arch) != _arch_key(arch):
            raise ModelLoadError(f"{e} The registry records these weights as {base.arch}.") from e
        raise
    return model, base


def own_weights(model_cfg: ModelConfig, model: nn.Module) -> ResolvedBase:
    """Lineage of a source that holds its weights: a transformers folder (the hash of its weight files, as
    saved, before the head or stem follow the data) or a .pt2 (the hash of the graph's weights)."""
    if model_cfg.exported is not None:
        from tasks.models.exported import file_of

        path = file_of(model_cfg.exported)
        state = {k: v.detach().cpu() for k, v in model.graph.state_dict().items()}
        return ResolvedBase(model_cfg.exported, str(path), state_dict_sha256(state), path, "exported", _state=state)
    from tasks.models.hf_folder import folder_of, weights_state

    path = folder_of(str(model_cfg.transformers))
    state = weights_state(path)
    return ResolvedBase(str(model_cfg.transformers), str(path), state_dict_sha256(state), path, "transformers",
                        _state=state)


def _arch_key(arch: dict[str, Any]) -> tuple:
    return arch.get("name"), arch.get("factory"), arch.get("transformers"), arch.get("kwargs") or {}


def read_artifact(path: Path, uri: str) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file, an MLflow PyTorch-flavor model folder, or a folder holding exactly one."""
    from tasks.models.user import read_weights

    if path.is_file():
        return read_weights(path)
    if not path.is_dir():
        raise ModelLoadError(f"weights {path} not found (model.weights {uri!r}); fix model.weights in pipelines.yaml")
    if (path / "MLmodel").is_file():
        return _read_mlflow_model(path, uri)
    models = sorted(p.parent for p in path.rglob("MLmodel"))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not any(m in p.parents for m in models))
    found = models + files
    if not found:
        raise ModelLoadError(
            f"no weights inside {uri}: it holds neither an MLflow PyTorch model (MLmodel) nor a "
            f"{'/'.join(WEIGHT_SUFFIXES)} state_dict. Point model.weights at the artifact that holds them"
        )
    if len(found) > 1:
        shown = ", ".join(str(p.relative_to(path)) for p in found[:6])
        raise ModelLoadError(f"{uri} holds several weights ({shown}); point model.weights at one of them, e.g. "
                             f"{uri.rstrip('/')}/{found[0].relative_to(path).as_posix()}")
    return read_artifact(found[0], uri)


def _read_mlflow_model(path: Path, uri: str) -> dict[str, torch.Tensor]:
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    flavors = Model.load(str(path / "MLmodel")).flavors
    if "pytorch" not in flavors:
        raise ModelLoadError(
            f"{uri} is an MLflow model with flavors {sorted(flavors)}, not pytorch; register the base with "
            "mlflow.pytorch (tasks.models.register_base_model does) or log a .pt/.safetensors state_dict"
        )
    import mlflow.pytorch

    try:
        module = mlflow.pytorch.load_model(str(path))
    except MlflowException as e:
        if "pickle" in str(e).lower():
            raise ModelLoadError(
                f"{uri} is a pickle-format PyTorch model and MLflow is set not to unpickle models "
                "(MLFLOW_ALLOW_PICKLE_DESERIALIZATION); re-register it with serialization_format='pt2' "
                "(register_base_model does), or set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true if you trust its source"
            ) from e
        raise ModelLoadError(f"cannot load the MLflow PyTorch model {uri}: {e}") from e
    except Exception as e:  # unpickling runs arbitrary code: a missing class, a torch mismatch
        raise ModelLoadError(f"cannot load the MLflow PyTorch model {uri} ({type(e).__name__}: {e}); "
                             "make its code importable or register its state_dict instead") from e
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{uri} loads as {type(module).__name__}, not a torch nn.Module")
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


@register_source("file")
def resolve_file(uri: str, root: Path, tracking_uri: str | None = None) -> ResolvedBase:
    """A local weights file (or folder), relative to the working directory as before."""
    raw = uri[len("file://"):] if uri.startswith("file://") else uri
    path = Path(raw).expanduser()
    if not path.exists():
        raise ModelLoadError(f"weights file {path} not found; fix model.weights in pipelines.yaml")
    path = path.resolve()
    state = read_artifact(path, uri)
    return ResolvedBase(uri, str(path), state_dict_sha256(state), path, "file", _state=state)


def _load_builtin() -> None:
    # Importing registers the MLflow sources; kept lazy so importing this module stays cheap.
    from tasks.models import mlflow_source  # noqa: F401
