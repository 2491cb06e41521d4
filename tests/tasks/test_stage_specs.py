"""tasks/stage_specs.py is the one declaration of what each stage consumes: dvc.yaml and the stage code agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.stage_specs import SPECS, STAGES, downstream

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
RUN = "${run}/"
DEVICES_FILE = "infra/devices.yaml"  # DVC's form of the "devices" external input


def _deps(stage: str) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in DVC[stage]["deps"]]


def test_dvc_declares_the_same_stages_in_order():
    assert tuple(DVC) == STAGES == tuple(SPECS)


def test_stages_folder_holds_one_run_module_per_stage_and_none_imports_another():
    """tasks/stages/ is the stages and nothing else; what two stages share lives outside it."""
    import ast
    import importlib

    folder = REPO / "tasks" / "stages"
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert modules == set(STAGES)
    for stage in STAGES:
        assert callable(importlib.import_module(f"tasks.stages.{stage}").run), stage
        tree = ast.parse((folder / f"{stage}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        others = {m for m in imported if m.startswith("tasks.stages")}
        assert not others, f"tasks/stages/{stage}.py imports {others}: move what they share out of tasks/stages/"


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_code_deps_match_the_spec(stage):
    spec = SPECS[stage]
    code = {d for d in _deps(stage) if not d.startswith(RUN) and d != DEVICES_FILE}
    assert code == set(spec.code), f"dvc.yaml {stage} deps differ from tasks/stage_specs.py"
    assert (DEVICES_FILE in _deps(stage)) == ("devices" in spec.external)
    for path in spec.code:
        assert (REPO / path).exists(), path


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_upstream_deps_match_the_spec(stage):
    upstream = {d[len(RUN):].split("/")[0] for d in _deps(stage) if d.startswith(RUN)}
    assert upstream == set(SPECS[stage].upstream)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_params_match_the_spec(stage):
    params = DVC[stage].get("params", [{"pipelines.yaml": []}])
    keys = [k for entry in params for k in entry["pipelines.yaml"]]
    assert {k.removeprefix("pipelines.digits_tiny.") for k in keys} == set(SPECS[stage].sections)


_READS = re.compile(r"""(?:require|model|metrics|stage_dir)\(\s*["'](\w+)["']""")


@pytest.mark.parametrize("stage", STAGES)
def test_the_stage_code_reads_only_declared_upstream_stages(stage):
    """Every other stage's folder a stage module (or a module it declares) opens is in its upstream list."""
    read: set[str] = set()
    for path in SPECS[stage].code:
        p = REPO / path
        for f in [p] if p.is_file() else sorted(p.rglob("*.py")):
            read |= set(_READS.findall(f.read_text()))
    read = (read & set(STAGES)) - {stage}
    assert read <= set(SPECS[stage].upstream), f"{stage} reads {sorted(read - set(SPECS[stage].upstream))}"


def test_downstream():
    assert downstream("compile") == ("compile", "benchmark", "register")
    assert downstream("prepare_data") == STAGES


def test_stage_specs_is_light():
    code = "import sys, tasks.stage_specs; print(sorted(m for m in ('torch', 'mlflow', 'airflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
