"""A short real run up to the register stage: prepare_data and train_base for real (synthetic data, a few
epochs), then a finetune output made from the base (or an untrained model) with figures that say what
the test wants, optionally an ONNX export and a deploy choice, so the register stage runs as in a
pipeline without search, compile and benchmark."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

PIPELINE = "synth"


def pipelines_yaml(num_samples: int, promotion: str) -> str:
    return textwrap.dedent(
        f"""
        pipelines:
          {PIPELINE}:
            data: {{source: synthetic, num_samples: {num_samples}, image_size: 8, num_classes: 4}}
            model: {{name: resnet8, kwargs: {{width: 4}}}}
            train: {{epochs: 3, batch_size: 32, lr: 0.05}}
            benchmark: {{batch_sizes: [1, 4], warmup: 1, repeat: 3, threads: 1}}
            promotion: {promotion}
        """
    )


@pytest.fixture
def fake_run(workspace: Path, tmp_path: Path) -> Callable[..., Path]:
    """make(run_id, num_samples=400, untrained=False, goal_met=True, recorded_accuracy=99.0, onnx=False,
    promotion="{cost: none}") -> the run folder, after the register stage ran."""
    from tasks.stage_runner import run_stage

    def make(run_id: str, *, num_samples: int = 400, untrained: bool = False, goal_met: bool = True,
             recorded_accuracy: float = 99.0, onnx: bool = False, promotion: str = "{cost: none}") -> Path:
        import torch

        from tasks.models.checkpoint import load_checkpoint, save_checkpoint
        from tasks.workspace import run_paths, write_json

        cfg = tmp_path / f"pipelines-{run_id}.yaml"
        cfg.write_text(pipelines_yaml(num_samples, promotion))
        for stage in ("prepare_data", "train_base"):
            run_stage(stage, PIPELINE, run_id, config_path=cfg, workspace=workspace)
        paths = run_paths(PIPELINE, run_id, workspace)
        fin = paths.stage_dir("finetune")
        fin.mkdir()
        base = paths.stage_dir("train_base")
        if untrained:
            model, payload = load_checkpoint(base / "model.pt")
            torch.manual_seed(123)
            for p in model.parameters():
                torch.nn.init.normal_(p, 0, 0.5)
            save_checkpoint(model, fin / "model.pt", arch=payload["arch"], input_shape=payload["input_shape"],
                            num_classes=payload["num_classes"])
        else:
            shutil.copy2(base / "model.pt", fin / "model.pt")
        base_m = json.loads((base / "metrics.json").read_text())
        metrics = {**base_m, "test_accuracy": recorded_accuracy, "goal_met": goal_met, "macs_reduction": 1.0,
                   "accuracy_drop": base_m["test_accuracy"] - recorded_accuracy}
        write_json(fin / "metrics.json", metrics)
        if onnx:
            from tasks.engines.onnx_runtime import export_onnx

            model, payload = load_checkpoint(fin / "model.pt")
            export_onnx(model, torch.zeros(1, *payload["input_shape"]), paths.stage_dir("compile") / "compressed" / "model.onnx")
            best = {"host": {"1": {"engine": "onnxruntime", "median_ms": 0.1},
                             "4": {"engine": "onnxruntime", "median_ms": 0.2}}}
            write_json(paths.stage_dir("benchmark") / "latency.json", {"pairs": [], "best": best})
        run_stage("register", PIPELINE, run_id, config_path=cfg, workspace=workspace)
        return paths.run_dir

    return make
