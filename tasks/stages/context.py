"""What every stage gets: the pipeline config, the run's folders, its MLflow child run, and loaders for
what earlier stages wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tasks.config import PipelineConfig
from tasks.tracking import StageRun
from tasks.workspace import RunPaths, read_json


@dataclass
class StageContext:
    cfg: PipelineConfig
    paths: RunPaths
    tracker: StageRun
    _cache: dict[str, Any] = field(default_factory=dict)

    def data_info(self) -> dict[str, Any]:
        return read_json(self.paths.require("prepare_data", "dataset.json"))

    def splits(self):
        """Normalised tensors of the run's data set (checked against its recorded hash)."""
        if "splits" not in self._cache:
            from tasks.data.dataset import load_dataset_file
            from tasks.data.loaders import Splits

            info = self.data_info()
            ds = load_dataset_file(
                self.paths.require("prepare_data", "dataset.npz"), expect_hash=info["hash"], source=info["source"]
            )
            self._cache["splits"] = Splits(ds, info["mean"], info["std"])
        return self._cache["splits"]

    def example(self, batch: int = 1) -> torch.Tensor:
        return self.splits().example(batch)

    def model(self, stage: str) -> tuple[nn.Module, dict[str, Any]]:
        """The checkpoint an earlier stage wrote (model.pt), rebuilt and in eval mode."""
        from tasks.models.checkpoint import load_checkpoint

        return load_checkpoint(self.paths.require(stage, "model.pt"))

    def metrics(self, stage: str) -> dict[str, Any]:
        return read_json(self.paths.require(stage, "metrics.json"))
