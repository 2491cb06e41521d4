"""User models: 'package.module:function' + kwargs, with weights from a .pt state_dict or .safetensors; and
`build_arch`, which builds any arch record (zoo name, factory, transformers config or folder, .pt2)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import ModelLoadError


def import_factory(spec: str):
    """'package.module:function' -> the callable."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(
            f"cannot import {mod_name!r} for model.factory {spec!r} ({e}); make the module importable "
            "(install your package or run from its folder)"
        ) from e
    except Exception as e:  # the module itself fails while importing: its error, not a bare traceback
        raise ModelLoadError(
            f"importing {mod_name!r} for model.factory {spec!r} failed: {type(e).__name__}: {e}. "
            "Fix the module so that it imports."
        ) from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelLoadError(f"{mod_name!r} has no callable {fn_name!r} (model.factory {spec!r})")
    return fn


def arch_of(model_cfg: Any) -> dict[str, Any]:
    """The arch record a checkpoint keeps for a pipeline's model section: one that rebuilds the architecture
    on its own. A transformers folder becomes its config's fields (the folder is not needed to rebuild); a
    .pt2 stays the file, with its sha256."""
    arch = model_cfg.arch()
    if isinstance(arch.get("transformers"), str):
        from tasks.models.hf_folder import portable_record

        return portable_record(arch["transformers"])
    if arch.get("exported"):
        from tasks.models.exported import portable_record as exported_record

        return exported_record(arch["exported"])
    return arch


def build_arch(arch: dict[str, Any], *, in_channels: int, num_classes: int) -> nn.Module:
    """Build a model from an arch record: fresh and untrained for a zoo name, factory or transformers config;
    with its own weights for a transformers folder or a .pt2 (they are the architecture's source)."""
    from tasks.models.registry import create_model

    kwargs = dict(arch.get("kwargs", {}))
    if arch.get("name"):
        return create_model(arch["name"], in_channels=in_channels, num_classes=num_classes, **kwargs)
    if isinstance(arch.get("transformers"), str):
        from tasks.models.hf_folder import load_folder

        return load_folder(arch["transformers"], in_channels=in_channels, num_classes=num_classes)
    if arch.get("transformers") is not None:
        from tasks.models.hf import build_transformers

        return build_transformers(arch["transformers"], in_channels=in_channels, num_classes=num_classes)
    if arch.get("exported"):
        from tasks.models.exported import load_exported

        return load_exported(arch["exported"], sha256=arch.get("sha256"))
    fn = import_factory(arch["factory"])
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise ModelLoadError(f"model.factory {arch['factory']!r} rejected kwargs {kwargs}: {e}") from e
    except Exception as e:  # the user's code: report it as a model error, not a bare traceback
        raise ModelLoadError(
            f"model.factory {arch['factory']!r} raised {type(e).__name__}: {e} when called with kwargs "
            f"{kwargs}. Fix the factory or model.kwargs in pipelines.yaml."
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model.factory {arch['factory']!r} returned {type(model).__name__}, not an nn.Module")
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors or a torch file (loaded with weights_only=True)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"weights file {p} not found; fix model.weights in pipelines.yaml")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot read weights {p} ({e}); give a state_dict saved with torch.save(model.state_dict()) "
            "or a .safetensors file"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{p} holds no state_dict (a mapping of names to tensors)")
    return obj
