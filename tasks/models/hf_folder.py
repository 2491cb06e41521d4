"""A transformers image classifier from a LOCAL folder written by `save_pretrained` (config.json + weights):
`model.transformers: path/to/folder`. Never the hub: every call passes `local_files_only=True`, and a
path that is not a folder is refused before transformers sees it.

The folder's weights are the base weights. The classifier head follows the data (`num_labels`): a head
of another size is re-initialised (ignore_mismatched_sizes), as when fine-tuning any pretrained model.

Grayscale data on an RGB model: adapted, not refused. The stem's weights (the only tensors whose shape
depends on `num_channels`) are summed over their input channels, the standard trick: on a gray image
the adapted model computes what the original computes on that image repeated in R, G and B. Any other
channel mismatch (RGB data on a 1-channel model, 4 channels, ...) is refused with the numbers.

The arch record a checkpoint keeps is the folder's config as fields (`portable_record`), so a
checkpoint rebuilds without the folder; the folder's path stays in the record as provenance only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import ModelLoadError
from tasks.models.hf import LogitsAdapter, classifier_class

# Config fields that say where the config came from or are set from the data, not what the model is.
NOISE = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id",
         "num_labels", "num_channels")


def folder_of(spec: str) -> Path:
    """The folder `model.transformers` names, checked to look like a save_pretrained folder."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model.transformers {spec!r} is not an existing folder; give a local folder written by "
            "save_pretrained (config.json + model.safetensors), or a config: {model_type: vit, ...}. "
            "shrinkflow never downloads from the Hugging Face hub: save the model to a folder first"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model.transformers {spec!r} has no config.json; point it at the folder that "
                             "save_pretrained wrote")
    return path.resolve()


def folder_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a broken config.json, an unknown model_type
        raise ModelLoadError(f"model.transformers {str(path)!r}: cannot read its config.json ({type(e).__name__}: "
                             f"{e}); re-save the model with save_pretrained from this transformers version") from e


def portable_record(spec: str) -> dict[str, Any]:
    """The arch record that rebuilds the folder's architecture without the folder: its config's fields."""
    path = folder_of(spec)
    fields = {k: v for k, v in folder_config(path).to_diff_dict().items() if k not in NOISE}
    return {"transformers": fields, "kwargs": {}, "folder": str(path)}


def weights_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in the folder's weight files (*.safetensors, else pytorch_model*.bin), for their hash."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"model.transformers {str(path)!r} holds no weights (model.safetensors or "
                             "pytorch_model.bin); save the model with save_pretrained, or give its config as fields "
                             "to train it from scratch")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # from_pretrained draws progress bars and a load report on stderr: noise in Airflow task logs.
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_folder(spec: str, *, in_channels: int, num_classes: int) -> nn.Module:
    """The folder's classifier with its weights, its head sized to the data, its stem to the data's channels."""
    path = folder_of(spec)
    config = folder_config(path)
    cls = classifier_class(config)
    src = int(getattr(config, "num_channels", in_channels))
    if src != in_channels and in_channels != 1:
        raise ModelLoadError(
            f"model.transformers {spec!r} takes {src}-channel images but the data has {in_channels}; only "
            f"grayscale data on a colour model is adapted. Use data with {src} channels or a model saved with "
            f"num_channels={in_channels}"
        )
    config.num_labels = num_classes
    try:
        with _quiet():
            model = cls.from_pretrained(str(path), config=config, ignore_mismatched_sizes=True, local_files_only=True)
    except Exception as e:  # missing or corrupt weights, a config its class rejects
        raise ModelLoadError(f"model.transformers {spec!r}: cannot load the model ({type(e).__name__}: {e}); "
                             "check the folder holds what save_pretrained wrote") from e
    if src != in_channels:
        model = _to_grayscale(model, cls, config, spec)
    return LogitsAdapter(model.eval())


def _to_grayscale(model: nn.Module, cls: type, config: Any, spec: str) -> nn.Module:
    """The same model taking 1 channel: every tensor whose shape depended on num_channels (the stem) summed
    over its input channels."""
    src = config.num_channels
    config.num_channels = 1
    gray = cls(config)
    own, theirs = gray.state_dict(), model.state_dict()
    state = {}
    for k, t in theirs.items():
        if k in own and own[k].shape != t.shape:
            if t.dim() < 3 or t.shape[1] != src or own[k].shape != (t.shape[0], 1, *t.shape[2:]):
                raise ModelLoadError(
                    f"model.transformers {spec!r}: cannot adapt {k} {tuple(t.shape)} to 1-channel images; give "
                    f"{src}-channel data or a model saved with num_channels=1"
                )
            t = t.sum(dim=1, keepdim=True)
        state[k] = t
    gray.load_state_dict(state, strict=True)
    return gray
