"""Inference engines by name (`benchmark.engines` in pipelines.yaml): build an artifact, load a runner.

Importing this package is cheap: torch, TVM and ONNX Runtime load only when an engine is used.
Every runner has `.run(x: np.ndarray) -> np.ndarray` (float32 NCHW in, logits out) and
`.input_shape` (None for a free batch size).

    engine = get_engine("tvm")
    meta = engine.build(model, example, target, out_dir)      # tvm_build.build_tvm
    runner = engine.load(out_dir)                              # tvm_build.load_tvm
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.errors import ConfigError


@dataclass(frozen=True)
class Engine:
    """Where an engine's build and load functions live; resolved on first use."""

    name: str
    module: str
    build_name: str | None
    load_name: str
    artifact: str
    description: str = ""

    def _attr(self, attr: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), attr)

    @property
    def build(self) -> Callable[..., Any] | None:
        """The function that writes the engine's artifact (None: runs the model as is)."""
        return self._attr(self.build_name) if self.build_name else None

    @property
    def load(self) -> Callable[..., Any]:
        """The function that returns a runner for the artifact."""
        return self._attr(self.load_name)


ENGINES: dict[str, Engine] = {}


def register_engine(engine: Engine) -> Engine:
    """Add (or replace) an engine under engine.name."""
    ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    """The engine called name, or ConfigError listing the known ones."""
    if name not in ENGINES:
        raise ConfigError(
            f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}. "
            "Fix benchmark.engines in pipelines.yaml."
        )
    return ENGINES[name]


register_engine(
    Engine(
        "pytorch",
        "tasks.engines.pytorch_eager",
        None,
        "load_eager",
        artifact="",
        description="PyTorch eager, the reference: load_eager(model, input_shape)",
    )
)
register_engine(
    Engine(
        "tvm",
        "tasks.engines.tvm_build",
        "build_tvm",
        "load_tvm",
        artifact="tvm",
        description="TVM Relax library: build_tvm(model, example, target, out_dir); load_tvm(out_dir)",
    )
)
register_engine(
    Engine(
        "onnxruntime",
        "tasks.engines.onnx_runtime",
        "export_onnx",
        "load_onnx",
        artifact="model.onnx",
        description="ONNX Runtime CPU: export_onnx(model, example, path); load_onnx(path, threads)",
    )
)
