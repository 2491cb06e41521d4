"""PyTorch eager as an engine: the reference every compiled engine is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.engines.base import check_input


class TorchRunner:
    """An nn.Module in eval mode under inference_mode; `.run(x)` takes float32 NCHW, returns logits."""

    def __init__(self, model: Any, input_shape: tuple[int | None, ...] | None = None):
        import torch

        self._torch = torch
        self.model = model.eval()
        # None: the model itself decides which shapes it accepts.
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch x (of shape input_shape when one was given)."""
        if self.input_shape is None:
            x = np.ascontiguousarray(x, dtype=np.float32)
        else:
            x = check_input(x, self.input_shape, f"model {type(self.model).__name__}")
        with self._torch.inference_mode():
            # from_numpy shares memory: no copy, as the other engines get the array as is.
            out = self.model(self._torch.from_numpy(x))
        out = out[0] if isinstance(out, tuple | list) else out
        return out.numpy()


def load_eager(model: Any, input_shape: tuple[int | None, ...] | None = None) -> TorchRunner:
    """Wrap a model; input_shape uses None for a free batch size, e.g. (None, 1, 28, 28)."""
    return TorchRunner(model, input_shape)
