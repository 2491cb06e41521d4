"""Model checkpoints that survive structural compression and load with torch.load(weights_only=True).

A checkpoint names the architecture (its arch record: zoo name, factory + kwargs, transformers config,
or a .pt2 file and its hash), records every module's tensor shapes and structural attributes
(tasks/models/structure.py: pruning changes them, whatever the layer type), and holds a plain
state_dict. Loading rebuilds the architecture, gives every module the recorded shapes, then loads the
weights strictly. Format 1 (only Conv2d/Linear/BatchNorm channel counts) is still read.

A layer that an op replaced by a chain of layers (low-rank factorisation turns a Conv2d into a
Sequential of Conv2d) is recorded under "factorised" and rebuilt before the resizing. Checkpoints
written before that key existed have none and load as before.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import ArtifactError, ModelLoadError
from tasks.models.structure import apply_structure, apply_structure_v1, extra_buffers_of, structure_of
from tasks.models.user import build_arch

FORMAT = "shrinkflow.checkpoint/2"
FORMAT_V1 = "shrinkflow.checkpoint/1"
FORMATS = (FORMAT, FORMAT_V1)


def _layer_spec(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return {"kind": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    return {
        "kind": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
        "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode,
    }


def _build_layer(spec: dict[str, Any]) -> nn.Module:
    if spec["kind"] == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    pad = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
    return nn.Conv2d(
        spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]), pad, tuple(spec["dilation"]),
        spec["groups"], spec["bias"], spec["padding_mode"],
    )


def factorised_of(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Every plain nn.Sequential made only of Conv2d/Linear layers (what factorisation puts in place of
    one layer), as the layer specs that rebuild it. Rebuilding one the architecture had anyway is harmless."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, m in model.named_modules():
        if name and type(m) is nn.Sequential and len(m) and all(type(c) in (nn.Conv2d, nn.Linear) for c in m):
            out[name] = [_layer_spec(c) for c in m]
    return out


def apply_factorised(model: nn.Module, factorised: dict[str, list[dict[str, Any]]]) -> nn.Module:
    """Put the recorded chains of layers in place of the architecture's modules, in place; weights are
    left for load_state_dict to fill."""
    for name, specs in factorised.items():
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        if parent is None or leaf not in parent._modules:
            raise ModelLoadError(f"checkpoint factorised layer {name!r} does not exist in the rebuilt model")
        setattr(parent, leaf, nn.Sequential(*[_build_layer(s) for s in specs]))
    return model


def save_checkpoint(
    model: nn.Module,
    path: Path,
    *,
    arch: dict[str, Any],
    input_shape: list[int],
    num_classes: int,
    meta: dict[str, Any] | None = None,
) -> int:
    """Write atomically; return the file size in bytes."""
    payload = {
        "format": FORMAT,
        "arch": arch,
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "structure": structure_of(model),
        "factorised": factorised_of(model),
        "extra_buffers": extra_buffers_of(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, in eval mode; return (model, payload without weights)."""
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} not found; run the stage that writes it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise ArtifactError(f"checkpoint {path} is corrupt or not a shrinkflow checkpoint ({e}); re-run its stage") from e
    if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
        raise ArtifactError(f"{path} is not a {FORMAT} checkpoint; re-run the stage that writes it")
    in_channels = payload["input_shape"][0]
    model = build_arch(payload["arch"], in_channels=in_channels, num_classes=payload["num_classes"])
    apply_factorised(model, payload.get("factorised", {}))
    if payload["format"] == FORMAT_V1:
        apply_structure_v1(model, payload["structure"])
    else:
        apply_structure(model, payload["structure"], payload.get("extra_buffers"))
    load_weights_strict(model, payload["state_dict"], source=str(path))
    model.eval()
    info = {k: v for k, v in payload.items() if k not in ("state_dict", "extra_buffers")}
    return model, info


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a message that lists what does not match, and how to fix it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:5]))
        raise ModelLoadError(
            f"weights in {source} do not match the model: {', '.join(parts)}. "
            "Check that model.name/factory and model.kwargs in pipelines.yaml are the ones the weights were "
            "trained with."
        )
    model.load_state_dict(state, strict=True)
