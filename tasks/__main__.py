"""`python -m tasks <stage> --pipeline NAME [--run-id ID]`: one stage, as DVC and Airflow run it."""

from __future__ import annotations

import argparse
import json
import sys

from tasks.errors import ShrinkflowError


def main(argv: list[str] | None = None) -> int:
    from tasks.stage_specs import STAGES

    p = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--pipeline", required=True)
    p.add_argument("--run-id", default="dvc", help="run id (default 'dvc': the folder dvc.yaml declares)")
    p.add_argument("--config", help="pipelines file (default ./pipelines.yaml)")
    p.add_argument("--workspace", help="artifact folder (default: $SHRINKFLOW_HOME or .shrinkflow beside the pipelines file)")
    p.add_argument("--force", action="store_true", help="recompute even when its inputs are unchanged")
    args = p.parse_args(argv)
    from tasks.stage_runner import run_stage
    from tasks.workspace import project_workspace

    try:
        workspace = project_workspace(args.workspace, args.config)  # beside the pipelines file, not the cwd
        result = run_stage(args.stage, args.pipeline, args.run_id, config_path=args.config, workspace=workspace,
                           force=True if args.force else None)
    except ShrinkflowError as e:
        print(f"shrinkflow: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
