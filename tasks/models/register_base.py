"""Register a base model in the MLflow registry as a PyTorch-flavor MLflow Model, the way a training team
does, so pipelines can name it: `model.weights: models:/<name>@<alias>`.

The model is saved with MLflow's `pt2` format (torch.export: no pickle, loads without the model's
code) and explicit pip requirements (no dependency inference, no network), logged to a run of the
`shrinkflow/base-models` experiment and registered with client calls only, so nothing changes
MLflow's process-wide tracking URI.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import ModelLoadError
from tasks.models.mlflow_source import client_for, registry_uri
from tasks.models.sources import state_dict_sha256

EXPERIMENT = "shrinkflow/base-models"


def _from_weights(state: dict[str, torch.Tensor], arch: dict[str, Any] | None, source: str) -> nn.Module:
    from tasks.models.checkpoint import load_weights_strict
    from tasks.models.user import build_arch

    if not arch or not (arch.get("name") or arch.get("factory")):
        raise ModelLoadError(f"registering the weights {source} needs their architecture: pass arch={{'name': "
                             "'resnet8', 'kwargs': {...}, 'input_shape': [C, H, W], 'num_classes': N}} "
                             "(or a factory instead of a name), or register a shrinkflow checkpoint")
    shape = arch.get("input_shape")
    if arch.get("name") and (not shape or not arch.get("num_classes")):
        raise ModelLoadError(f"registering the weights {source} of zoo model {arch['name']!r} needs "
                             "arch['input_shape'] ([C, H, W]) and arch['num_classes'] to build it")
    model = build_arch(arch, in_channels=int(shape[0]) if shape else 1, num_classes=int(arch.get("num_classes") or 0))
    load_weights_strict(model, state, source=source)
    return model


def as_module(obj: nn.Module | dict[str, torch.Tensor] | str | Path, arch: dict[str, Any] | None
              ) -> tuple[nn.Module, dict[str, Any] | None, list[int] | None]:
    """(model, arch record, input shape) from a module, a state_dict, a shrinkflow checkpoint or a weights file."""
    from tasks.models.checkpoint import FORMATS, load_checkpoint
    from tasks.models.user import read_weights

    shape = (arch or {}).get("input_shape")
    if isinstance(obj, nn.Module):
        return obj, arch, shape
    if isinstance(obj, dict):
        return _from_weights(obj, arch, "the given state_dict"), arch, shape
    path = Path(obj).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path} not found; give a shrinkflow checkpoint (e.g. a run's train_base/model.pt) "
                             "or a .pt/.safetensors state_dict")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True) if path.suffix != ".safetensors" else None
    except Exception:
        payload = None  # read_weights below says what is wrong with the file
    if isinstance(payload, dict) and payload.get("format") in FORMATS:
        model, info = load_checkpoint(path)
        recorded = {**info["arch"], "input_shape": info["input_shape"], "num_classes": info["num_classes"]}
        return model, {**recorded, **(arch or {})}, shape or info["input_shape"]
    return _from_weights(read_weights(path), arch, str(path)), arch, shape


def _example(model: nn.Module, input_example: Any, shape: list[int] | None) -> Any:
    if input_example is None:
        if not shape:
            raise ModelLoadError("registering a model needs its input shape: pass input_example (a batch, e.g. "
                                 "torch.zeros(2, 1, 28, 28)) or arch['input_shape'] ([C, H, W])")
        input_example = torch.zeros(2, *[int(s) for s in shape])  # batch 2: export keeps the batch dim dynamic
    return input_example.detach().cpu().numpy() if isinstance(input_example, torch.Tensor) else input_example


def _version_with(client, name: str, sha: str) -> str | None:
    """An existing version of `name` holding these exact weights (re-registering them adds none)."""
    for mv in client.search_model_versions(f"name = '{name}' and tags.sha256 = '{sha}'"):
        return str(mv.version)
    return None


def register_base_model(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor] | str | Path,
    name: str,
    *,
    alias: str | None = None,
    tracking_uri: str | None = None,
    arch: dict[str, Any] | None = None,
    input_example: Any = None,
    workspace: str | Path | None = None,
) -> str:
    """Log a base model as an MLflow PyTorch model, register it as `name` (moving `alias` if given); return the version.

    arch: the architecture record (`name` or `factory`, `kwargs`), kept as the version's tag
    `shrinkflow.arch`; building from a state_dict or weights file also needs `input_shape` and, for a zoo
    model, `num_classes`. The same weights registered again return their existing version.
    """
    from tasks.workspace import workspace_root

    model, arch, shape = as_module(model_or_state_dict, arch)
    example = _example(model, input_example, shape)  # before any registry call: a missing shape fails first
    root = workspace_root(workspace)
    uri = registry_uri(root, tracking_uri)
    client = client_for(uri, f"models:/{name}")
    sha = state_dict_sha256(model.state_dict())
    version = _version_with(client, name, sha)
    if version is None:
        version = _log_and_register(client, root, model, name, sha, arch, example)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def _log_and_register(client, root: Path, model: nn.Module, name: str, sha: str, arch: dict[str, Any] | None,
                      example: Any) -> str:
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from tasks.tracking import ensure_experiment

    arch_json = json.dumps({k: v for k, v in (arch or {}).items()}, sort_keys=True)
    exp = ensure_experiment(client, root, EXPERIMENT, "base-models")
    run = client.create_run(exp, run_name=f"register {name}", tags={"base_model.sha256": sha, "shrinkflow.arch": arch_json})
    rid = run.info.run_id
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="shrinkflow-register-") as tmp:
            mlflow.pytorch.save_model(
                model, f"{tmp}/model", input_example=example, serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata={"shrinkflow": {"arch": arch, "sha256": sha}},
            )
            client.log_artifacts(rid, f"{tmp}/model", "model")
    except MlflowException as e:
        client.set_terminated(rid, "FAILED")
        raise ModelLoadError(f"cannot save {name} as an MLflow PyTorch model: {e.message}") from e
    except Exception as e:  # torch.export rejects the model or the example
        client.set_terminated(rid, "FAILED")
        raise ModelLoadError(f"cannot export {name} with torch.export ({type(e).__name__}: {e}); check that "
                             "input_example is a batch the model accepts") from e
    finally:
        model.train(was_training)
    client.set_terminated(rid, "FINISHED")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="base model registered for shrinkflow")
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=rid,
                                     tags={"sha256": sha, "shrinkflow.arch": arch_json})
    return str(mv.version)
