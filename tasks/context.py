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

    def plan(self) -> list[Any]:
        """The op configs the compress stage applied (compress/plan.json)."""
        from tasks.plan import plan_from_json

        return plan_from_json(read_json(self.paths.require("compress", "plan.json")))

    def deployed_model(self, model: nn.Module) -> nn.Module:
        """model with the plan's post-training ops (int8) applied, as the finetune stage scored it (same
        calibration batches): the quantized model the int8 and FPGA engines implement."""
        import copy

        from compression_ops import OpData
        from tasks.plan import apply_ops, ops_in_phase

        post = ops_in_phase(self.plan(), "post")
        if not post:
            return model
        sp = self.splits()
        data = OpData(example=self.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=16)
        return apply_ops(self.cfg, copy.deepcopy(model), post, data, quiet=True)[0].eval()
