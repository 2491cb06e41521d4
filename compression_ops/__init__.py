"""Compression algorithms, pure PyTorch: nn.Module in, nn.Module out. No I/O, no tracking.

    result = apply(model, ChannelPrune(target_macs_reduction=2.0), OpData(example=x))
"""

from compression_ops.base import OpConfig, OpConfigError, OpData, OpResult, TrainHook, apply, config_from_dict
from compression_ops.channel_prune import ChannelPrune
from compression_ops.distill import Distill, kd_loss
from compression_ops.finetune import TrainSpec, evaluate, fit
from compression_ops.kmeans_quant import KMeansQuant
from compression_ops.low_rank import LowRank
from compression_ops.metrics import model_stats
from compression_ops.packing import pack_model, packed_size, unpack_model
from compression_ops.quantize import QuantAware, QuantizeInt8
from compression_ops.sparsity import Sparsify

__all__ = [
    "ChannelPrune",
    "Distill",
    "KMeansQuant",
    "LowRank",
    "OpConfig",
    "OpConfigError",
    "OpData",
    "OpResult",
    "QuantAware",
    "QuantizeInt8",
    "Sparsify",
    "TrainHook",
    "TrainSpec",
    "apply",
    "config_from_dict",
    "evaluate",
    "fit",
    "kd_loss",
    "model_stats",
    "pack_model",
    "packed_size",
    "unpack_model",
]
