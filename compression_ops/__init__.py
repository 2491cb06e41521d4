"""Compression algorithms, pure PyTorch: nn.Module in, nn.Module out. No I/O, no tracking.

    result = apply(model, ChannelPrune(target_macs_reduction=2.0), OpData(example=x))
"""

from compression_ops.base import OpConfig, OpConfigError, OpData, OpResult, TrainHook, apply, config_from_dict
from compression_ops.channel_prune import ChannelPrune
from compression_ops.distill import Distill, kd_loss
from compression_ops.finetune import TrainSpec, evaluate, fit
from compression_ops.low_rank import LowRank
from compression_ops.metrics import model_stats

__all__ = [
    "ChannelPrune",
    "Distill",
    "LowRank",
    "OpConfig",
    "OpConfigError",
    "OpData",
    "OpResult",
    "TrainHook",
    "TrainSpec",
    "apply",
    "config_from_dict",
    "evaluate",
    "fit",
    "kd_loss",
    "model_stats",
]
