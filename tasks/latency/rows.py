"""The benchmark's rows: frozen, typed, keyed; latency.json holds them as plain dicts (to_json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Latency:
    """One model on one engine and target at one batch size: latency of a call in ms."""

    model: str  # "base" or "compressed"
    engine: str
    target: str
    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    n: int | None = None  # calls timed (None: samples of `number` calls each, timed on the device)
    emulated: bool | None = False  # timed on an emulator (None: unknown)
    artifact_bytes: int | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.model, self.engine, self.target, self.batch)


@dataclass(frozen=True)
class Check:
    """One model on one engine and target: its outputs on the test split against PyTorch's."""

    model: str
    engine: str
    target: str
    images: int
    test_accuracy: float
    max_abs_diff_vs_pytorch: float | None
    top1_agreement_vs_pytorch: float | None
    seconds_per_image: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.engine, self.target)


@dataclass(frozen=True)
class Pair:
    """Base and compressed side by side on one engine, target and batch size."""

    engine: str
    target: str
    batch: int
    base_ms: float
    compressed_ms: float
    base_p90_ms: float
    compressed_p90_ms: float
    speedup: float
    emulated: bool | None


@dataclass(frozen=True)
class Skipped:
    """A build the compile stage skipped: the engine cannot express the model (nothing to check or time)."""

    model: str
    engine: str
    target: str
    reason: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.engine, self.target)


def to_json(rows: list[Any]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) for r in rows]
