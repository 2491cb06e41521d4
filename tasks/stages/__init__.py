"""The pipeline's stages, one module each, every one a `run(ctx: StageContext, out: Path) -> dict`.

Their order and inputs are declared in tasks/stage_specs.py; tasks/stage_runner.py runs one. Stages never
import each other: what two stages share lives outside this package (tasks/context.py, tasks/plan.py,
tasks/measure.py, tasks/engines/).
"""
