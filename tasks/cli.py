"""The `shrinkflow` command: run pipelines through Airflow, list them, show runs, run single stages."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tasks.errors import ShrinkflowError


def _cmd_run(args: argparse.Namespace) -> int:
    from tasks.check import check_pipeline
    from tasks.config import load_pipeline
    from tasks.progress import say
    from tasks.run_params import conf_from_cli, parse_conf, parse_force, start_run
    from tasks.stage_specs import STAGES
    from tasks.workspace import new_run_id, run_paths

    cfg = load_pipeline(args.pipeline, args.config)  # a bad name or file fails here, before any work
    conf = conf_from_cli(args.set, args.base_model)
    params = parse_conf(conf, cfg, STAGES)  # bad overrides fail here too, with the field and the fix
    # Everything knowable without training (config, devices, model, data, services) fails here, before any work.
    check_pipeline(args.pipeline, args.config, workspace=args.workspace, overrides=params.overrides,
                   echo=lambda line: say(f"check: {line}"))
    run_id = args.run_id or new_run_id()
    force = parse_force(args.force, STAGES)  # --force alone: every stage; --force STAGE: it and every later one
    if force is not None:
        conf["force"] = force
    # The DAG's start task (or start_run below) stores force and the overrides in run.json for every stage;
    # a resume without --force clears an earlier run's force.
    if sys.stderr.isatty():  # Airflow's task runner wraps stderr: decide on progress bars out here
        os.environ.setdefault("SHRINKFLOW_PROGRESS", "1")
    if args.no_airflow:
        from tasks.stage_runner import run_stage

        # What the DAG's start task does (checked above): record the overrides and force in run.json.
        run_id = start_run(args.pipeline, conf, default_run_id=run_id, stages=STAGES, config_path=args.config,
                           workspace=args.workspace, check=False)
        for stage in STAGES:
            run_stage(stage, args.pipeline, run_id, config_path=args.config, workspace=args.workspace)
    else:
        from tasks.orchestrate import run_pipeline

        run_pipeline(args.pipeline, run_id, config_path=args.config, workspace=args.workspace, conf=conf)
    from tasks.report import print_run_summary

    print_run_summary(run_paths(args.pipeline, run_id, args.workspace))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from tasks.check import WAITING, check_pipeline

    lines = check_pipeline(args.pipeline, args.config, workspace=args.workspace, services=not args.no_services,
                           allow_waiting=True, echo=lambda line: print(f"{'-' if line.startswith(WAITING) else chr(0x2713)} {line}",
                                                   flush=True))
    if any(line.startswith(WAITING) for line in lines):
        print(f"pipeline {args.pipeline!r}: ready to run once what it waits for is there (a run before that fails)")
    else:
        print(f"pipeline {args.pipeline!r}: ready to run")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from tasks.config import load_pipelines
    from tasks.workspace import list_runs

    pipelines = load_pipelines(args.config)
    print("Pipelines (pipelines.yaml):")
    for name, cfg in pipelines.items():
        goal = cfg.goal
        goal_s = (f"{goal.speedup}x " + ("fewer MACs, " if goal.metric == "macs" else "faster (measured), ")) if goal.speedup else ""
        goal_s += f"<= {goal.size_mb} MB, " if goal.size_mb else ""
        goal_s += f"<= {goal.latency_ms} ms, " if goal.latency_ms else ""
        print(f"  {name:20s} {cfg.data.source} / {cfg.model.label()}; goal: {goal_s}"
              f"<= {goal.max_accuracy_drop} pt drop; targets {', '.join(cfg.targets)}")
    runs = list_runs(args.workspace)
    print(f"\nRuns ({len(runs)}):" if runs else "\nNo runs yet: shrinkflow run <pipeline>")
    for r in runs:
        state = r.read_state()
        done = list(state.get("stages", {}))
        fin = state.get("stages", {}).get("finetune", {})
        goal = "" if not fin else ("goal met" if fin.get("goal_met") else "goal NOT met")
        print(f"  {r.pipeline}/{r.run_id}: {len(done)}/8 stages {goal}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from tasks.errors import StageError
    from tasks.report import print_run_summary
    from tasks.workspace import list_runs

    matches = [r for r in list_runs(args.workspace) if args.run in (r.run_id, f"{r.pipeline}/{r.run_id}")]
    if args.run in ("last", "latest"):
        matches = list_runs(args.workspace)[-1:]
    if not matches:
        raise StageError(f"no run {args.run!r} in the workspace; `shrinkflow list` shows the runs")
    print_run_summary(matches[-1])
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from tasks.stage_runner import run_stage

    result = run_stage(
        args.stage, args.pipeline, args.run_id, config_path=args.config, workspace=args.workspace,
        force=True if args.force else None,
    )
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_search_worker(args: argparse.Namespace) -> int:
    from tasks.stages.search import setup, worker

    if args.setup:
        print(json.dumps(setup(args.pipeline, args.run_id, config_path=args.config, workspace=args.workspace)))
        return 0
    result = worker(args.pipeline, args.run_id, args.index, config_path=args.config, workspace=args.workspace,
                    max_trials=args.max_trials)
    print(json.dumps(result))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    """Move the champion alias by hand (promote <version>) or back (rollback); both are recorded in MLflow."""
    from tasks import registry

    pipeline = args.pipeline or registry.default_pipeline(args.workspace)
    if args.cmd == "promote":
        done = registry.promote(pipeline, args.version, reason=args.reason, workspace=args.workspace,
                                point=args.point)
    else:
        done = registry.rollback(pipeline, reason=args.reason, workspace=args.workspace, point=args.point)
    print(f"{done['model']}: champion v{done['from']} -> v{done['to']} ({done['action']} by {done['by']}: "
          f"{done['reason']}); recorded in MLflow run {done['mlflow_run']}")
    return 0


def _cmd_register_base(args: argparse.Namespace) -> int:
    from tasks.errors import ConfigError
    from tasks.models.register_base import register_base_model

    arch = None
    if args.model or args.factory:
        try:
            kwargs = json.loads(args.kwargs or "{}")
        except ValueError as e:
            raise ConfigError(f"--kwargs {args.kwargs!r} is not JSON ({e}); write e.g. --kwargs '{{\"width\": 16}}'") from e
        arch = {"name": args.model} if args.model else {"factory": args.factory}
        arch["kwargs"] = kwargs
        if args.input_shape:
            arch["input_shape"] = [int(x) for x in args.input_shape.split(",")]
        if args.num_classes:
            arch["num_classes"] = args.num_classes
    version = register_base_model(args.weights, args.name, alias=args.alias, arch=arch, workspace=args.workspace)
    ref = f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{version}"
    print(f"registered {args.name} version {version}{f' as @{args.alias}' if args.alias else ''}; "
          f"use it as model.weights: {ref}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from tasks.airflow_services import up

    return up(args.workspace, config_path=args.config, port=args.port, mlflow_port=args.mlflow_port)


def _cmd_airflow(args: argparse.Namespace) -> int:
    """Run the airflow CLI with shrinkflow's embedded settings (e.g. `shrinkflow airflow dags list`)."""
    import subprocess

    from tasks.orchestrate import embedded_airflow

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    with embedded_airflow(args.workspace, config_path=args.config) as env:  # migrates the DB first
        return subprocess.call([airflow, *rest], env={**os.environ, **env})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shrinkflow", description=__doc__)
    p.add_argument("--config", help="pipelines file (default: ./pipelines.yaml or $SHRINKFLOW_PIPELINES)")
    p.add_argument("--workspace", help="artifact folder (default: $SHRINKFLOW_HOME or .shrinkflow beside the pipelines file)")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a pipeline end to end through its Airflow DAG (in-process)")
    r.add_argument("pipeline")
    r.add_argument("--run-id", help="reuse or name a run (default: a new timestamped id)")
    r.add_argument("--no-airflow", action="store_true", help="call the stages directly, without Airflow")
    r.add_argument("--force", nargs="?", const=True, metavar="STAGE",
                   help="recompute instead of reusing unchanged stages: all, or STAGE and every later one")
    r.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a pipelines.yaml field for this run, e.g. --set goal.speedup=2.5 (repeatable)")
    r.add_argument("--base-model", metavar="URI",
                   help="the base to recompress: models:/<name>/<version>, models:/<name>@<alias>, runs:/..., a "
                   "file, or a bare version/alias of the model in model.weights")
    r.set_defaults(fn=_cmd_run)

    c = sub.add_parser("check", help="validate a pipeline without training: config, devices, model, data, services")
    c.add_argument("pipeline")
    c.add_argument("--no-services", action="store_true", help="skip the network (study storage, MLflow, RPC devices)")
    c.set_defaults(fn=_cmd_check)

    sub.add_parser("list", help="pipelines declared and runs in the workspace").set_defaults(fn=_cmd_list)

    s = sub.add_parser("show", help="the summary table and paths of a run ('last' for the newest)")
    s.add_argument("run")
    s.set_defaults(fn=_cmd_show)

    st = sub.add_parser("stage", help="run one stage (what DVC and Airflow call)")
    st.add_argument("stage")
    st.add_argument("--pipeline", required=True)
    st.add_argument("--run-id", required=True)
    st.add_argument("--force", action="store_true", help="recompute even when its inputs are unchanged")
    st.set_defaults(fn=_cmd_stage)

    w = sub.add_parser("search-worker", help="run trials of a run's shared search study (one of many workers)")
    w.add_argument("--pipeline", required=True)
    w.add_argument("--run-id", required=True)
    w.add_argument("--index", type=int, default=0, help="this worker's number (seeds its sampler)")
    w.add_argument("--max-trials", type=int, help="at most this many trials here (default: until the budget is spent)")
    w.add_argument("--setup", action="store_true", help="only prepare the study (scan, warm starts) and exit")
    w.set_defaults(fn=_cmd_search_worker)

    rb = sub.add_parser("register-base", help="register a base model (checkpoint or weights) in the MLflow registry")
    rb.add_argument("weights", help="a shrinkflow checkpoint (a run's train_base/model.pt) or a .pt/.safetensors state_dict")
    rb.add_argument("--name", required=True, help="registered model name, e.g. fashion-base")
    rb.add_argument("--alias", help="move this alias to the version, e.g. production")
    arch = rb.add_mutually_exclusive_group()
    arch.add_argument("--model", help="zoo model of a plain state_dict, e.g. resnet8")
    arch.add_argument("--factory", help="user model of a plain state_dict, 'module:function'")
    rb.add_argument("--kwargs", help="the model's kwargs as JSON, e.g. '{\"width\": 16}'")
    rb.add_argument("--input-shape", help="C,H,W of one input, e.g. 1,28,28 (for a plain state_dict)")
    rb.add_argument("--num-classes", type=int, help="classes (for a zoo model's plain state_dict)")
    rb.set_defaults(fn=_cmd_register_base)

    u = sub.add_parser("up", help="start Airflow (scheduler, UI) and the MLflow UI on 127.0.0.1 until Ctrl-C")
    u.add_argument("--port", type=int, help="Airflow's port (default $AIRFLOW__API__PORT or 8080)")
    u.add_argument("--mlflow-port", type=int, help="the MLflow UI's port (default 5000)")
    u.set_defaults(fn=_cmd_up)

    pr = sub.add_parser("promote", help="make a registered version the champion by hand (recorded)")
    pr.add_argument("version", help="the model version number (see the MLflow UI, Models)")
    rb = sub.add_parser("rollback", help="move the champion back to the previous champion (recorded)")
    for q in (pr, rb):
        q.add_argument("--pipeline", help="whose registered model (default: the only one in the workspace)")
        q.add_argument("--point", help="a frontier point's registered model (goal.frontier), e.g. 3x")
        q.add_argument("--reason", default="", help="why, for the record")
        q.set_defaults(fn=_cmd_promote)

    a = sub.add_parser("airflow", help="the airflow CLI with shrinkflow's settings, e.g. `airflow dags list`")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    a.set_defaults(fn=_cmd_airflow)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from tasks.workspace import project_workspace

        # Defaults count from the project (the pipelines file's folder), not the cwd.
        args.workspace = str(project_workspace(args.workspace, args.config))
        return args.fn(args)
    except ShrinkflowError as e:
        print(f"shrinkflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shrinkflow: interrupted", file=sys.stderr)
        return 130


