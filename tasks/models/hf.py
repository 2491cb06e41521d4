"""Hugging Face `transformers` image classifiers as shrinkflow models: built from a config (a dict of
`model_type` and its fields) with random weights, behind an adapter that returns the logits tensor.

transformers is pure PyTorch; nothing here reaches the hub. The arch record is
`{"transformers": {"model_type": "vit", "patch_size": 4, ...}}`; `num_channels` and `num_labels`
always follow the data, so a checkpoint rebuilds the same model from its record alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tasks.errors import ModelLoadError


class LogitsAdapter(nn.Module):
    """Calls a transformers `...ForImageClassification` model on pixel_values and returns `.logits`,
    so the model is a plain `tensor -> tensor` classifier to every op, exporter and engine."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_config(fields: dict[str, Any], *, in_channels: int, num_classes: int):
    """A transformers config of `fields["model_type"]` with the data's channels and classes."""
    from transformers import AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelLoadError(
            "model.transformers needs a model_type (e.g. vit, convnext, resnet, regnet, mobilenet_v2, swin, "
            "mobilevit) beside the config fields"
        )
    fields.update(num_channels=in_channels, num_labels=num_classes)
    try:
        AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"model.transformers: model_type {model_type!r} is not a transformers config: {e}") from e
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers validates fields (types, ranges) with its own error classes
        raise ModelLoadError(f"model.transformers: a field of the {model_type!r} config is invalid: "
                             f"{' '.join(str(e).split())}. Fix it in model.transformers") from e


def classifier_class(config: Any) -> type:
    """The `...ForImageClassification` class of a transformers config."""
    from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    try:
        cls = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"model.transformers: {config.model_type!r} has no image-classification model in transformers; "
            "use a vision classifier type (vit, deit, convnext, resnet, regnet, mobilenet_v2, swin, mobilevit, ...)"
        ) from None
    if isinstance(cls, tuple | list):  # e.g. deit: the plain classifier first, then the one with a teacher head
        cls = cls[0]
    return cls


def build_transformers(fields: dict[str, Any], *, in_channels: int, num_classes: int) -> nn.Module:
    """A randomly initialised transformers image classifier behind LogitsAdapter."""
    config = hf_config(fields, in_channels=in_channels, num_classes=num_classes)
    cls = classifier_class(config)
    try:
        model = cls(config)
    except Exception as e:  # the config's own checks (e.g. heads not dividing the hidden size)
        raise ModelLoadError(f"model.transformers: cannot build {config.model_type!r}: {type(e).__name__}: {e}") from e
    return LogitsAdapter(model)
