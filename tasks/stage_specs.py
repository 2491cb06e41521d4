"""What each stage consumes: the stage order, and per stage its upstream outputs, config sections,
code paths and external inputs. The one declaration behind stage fingerprints (tasks/incremental.py);
dvc.yaml declares the same deps and params, and tests/tasks/test_stage_specs.py keeps the two in step.

Light on purpose (no torch, MLflow or Airflow): the DAG file and the CLI can import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("prepare_data", "train_base", "search", "compress", "finetune", "compile", "benchmark", "register")


@dataclass(frozen=True)
class StageSpec:
    """What one stage reads: its output is a function of these (and of nothing else that matters)."""

    name: str
    upstream: tuple[str, ...]  # stages whose output folders it reads
    sections: tuple[str, ...]  # top-level pipelines.yaml sections it reads
    code: tuple[str, ...]  # repo paths (files or folders) whose code computes its output
    external: tuple[str, ...] = ()  # inputs from outside the run: "data", "base_model", "devices"
    per_pipeline: bool = False  # its output belongs to one pipeline (the registry): never shared across


_LOADERS = "tasks/data/loaders.py"  # the normalised splits every stage after prepare_data trains or tests on

SPECS: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("prepare_data", (), ("data",), ("tasks/data", "tasks/stages/prepare_data.py"), ("data",)),
        StageSpec(
            "train_base", ("prepare_data",), ("model", "train"),
            ("tasks/stages/train_base.py", "tasks/measure.py", "tasks/models", _LOADERS,
             "compression_ops/finetune.py", "compression_ops/metrics.py"),
            ("base_model",),
        ),
        StageSpec(
            "search", ("prepare_data", "train_base"), ("goal", "compression", "finetune", "search", "train"),
            ("tasks/stages/search.py", "tasks/plan.py", "tasks/search", "tasks/plots.py", "compression_ops",
             "tasks/models", _LOADERS),
        ),
        StageSpec(
            "compress", ("prepare_data", "train_base", "search"), (),
            ("tasks/stages/compress.py", "tasks/plan.py", "compression_ops", "tasks/models", _LOADERS),
        ),
        StageSpec(
            "finetune", ("prepare_data", "train_base", "search", "compress"), ("finetune", "goal", "train"),
            ("tasks/stages/finetune.py", "tasks/plan.py", "tasks/measure.py", "compression_ops",
             "tasks/models", _LOADERS),
        ),
        StageSpec(
            "compile", ("prepare_data", "train_base", "compress", "finetune"), ("targets", "compile", "benchmark"),
            ("tasks/stages/compile.py", "tasks/context.py", "tasks/plan.py", "tasks/engines", "tasks/devices.py",
             "compression_ops", "tasks/models", _LOADERS),
            ("devices",),
        ),
        StageSpec(
            "benchmark", ("prepare_data", "train_base", "compress", "finetune", "compile"), ("targets", "benchmark"),
            ("tasks/stages/benchmark.py", "tasks/latency", "tasks/context.py", "tasks/plan.py", "tasks/engines",
             "tasks/devices.py", "compression_ops", "tasks/models", _LOADERS),
            ("devices",),
        ),
        StageSpec(
            "register", ("prepare_data", "train_base", "search", "finetune", "compile", "benchmark"), ("promotion",),
            ("tasks/stages/register.py", "tasks/report.py", "tasks/serving.py", "tasks/champion.py", "tasks/gate.py",
             "tasks/registry.py", "tasks/frontier.py"),
            per_pipeline=True,
        ),
    )
}


def spec(stage: str) -> StageSpec:
    return SPECS[stage]


def downstream(stage: str) -> tuple[str, ...]:
    """The stage and every stage after it, in order (what `--force <stage>` recomputes)."""
    return STAGES[STAGES.index(stage):]
