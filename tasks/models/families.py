"""The model families shrinkflow is tested on, each as a tiny arch record for 1x28x28 inputs and 10
classes: the contract test (tests/test_families.py) and bench/families.py iterate this table, so a
family added here is tested and benchmarked without editing either.

Each entry names the architectural features it exercises (what makes it hard for an op or an
engine): attention heads, LayerNorm, grouped / depthwise convs, squeeze-excitation, hard-swish,
windowed attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    arch: dict[str, Any]  # what model.{name|factory|transformers} + kwargs hold in pipelines.yaml
    features: tuple[str, ...]
    # A wider version for bench/families.py (same structure, more channels); None: arch as is.
    bench_arch: dict[str, Any] | None = field(default=None)


def _hf(model_type: str, **fields: Any) -> dict[str, Any]:
    return {"transformers": {"model_type": model_type, **fields}, "kwargs": {}}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("resnet_basic", _hf("resnet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                               downsample_in_first_stage=False),
           ("residual", "batchnorm"),
           _hf("resnet", embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
               downsample_in_first_stage=False)),
    Family("resnet_bottleneck", _hf("resnet", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                    layer_type="bottleneck"),
           ("residual", "bottleneck", "batchnorm"),
           _hf("resnet", embedding_size=32, hidden_sizes=[64, 128, 256], depths=[1, 1, 1], layer_type="bottleneck")),
    Family("convnext", _hf("convnext", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, patch_size=2),
           ("layernorm", "depthwise", "layer_scale", "gelu"),
           _hf("convnext", hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_stages=3, patch_size=2)),
    Family("regnet", _hf("regnet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
           ("grouped_conv", "squeeze_excitation", "batchnorm"),
           _hf("regnet", embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], groups_width=16,
               layer_type="y")),
    Family("mobilenet_v2", _hf("mobilenet_v2", image_size=28, depth_multiplier=0.35, finegrained_output=False),
           ("depthwise", "inverted_residual", "relu6"),
           _hf("mobilenet_v2", image_size=28, depth_multiplier=0.5, finegrained_output=False)),
    Family("mobilenet_v3", {"name": "mobilenet_v3_tiny", "kwargs": {"width": 0.5, "last": 64}},
           ("depthwise", "inverted_residual", "squeeze_excitation", "hard_swish"),
           {"name": "mobilenet_v3_tiny", "kwargs": {"width": 1.0, "last": 256}}),
    Family("vit", _hf("vit", image_size=28, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64),
           ("attention", "layernorm", "gelu", "class_token", "position_embedding"),
           _hf("vit", image_size=28, patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=192)),
    Family("deit", _hf("deit", image_size=28, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64),
           ("attention", "layernorm", "gelu", "class_token", "distillation_token", "position_embedding"),
           _hf("deit", image_size=28, patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=192)),
    Family("swin", _hf("swin", image_size=28, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                       window_size=7),
           ("windowed_attention", "relative_position_bias", "layernorm", "patch_merging"),
           _hf("swin", image_size=28, patch_size=2, embed_dim=48, depths=[2, 2], num_heads=[3, 6], window_size=7)),
    Family("mobilevit", _hf("mobilevit", image_size=28, patch_size=2, hidden_sizes=[32, 48, 64],
                            neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 64], num_attention_heads=2, expand_ratio=2.0),
           ("attention", "depthwise", "layernorm", "unfold_patches", "silu"),
           _hf("mobilevit", image_size=28, patch_size=2, hidden_sizes=[64, 80, 96],
               neck_hidden_sizes=[16, 24, 48, 64, 80, 96, 384], num_attention_heads=4)),
)}


def family_names() -> list[str]:
    return list(FAMILIES)
