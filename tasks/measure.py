"""Quick measurements shared by stages: size, cost and a short eager latency probe.

The benchmark stage does the careful, side-by-side timing; this is for per-stage logging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compression_ops.metrics import model_stats


def eager_latency_ms(model: nn.Module, example: torch.Tensor, repeat: int = 30, warmup: int = 5) -> float:
    import time

    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeat):
            t = time.perf_counter()
            model(example)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def measure_model(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    stats = model_stats(model, example)
    stats["latency_b1_ms"] = round(eager_latency_ms(model, example[:1]), 4)
    return stats
