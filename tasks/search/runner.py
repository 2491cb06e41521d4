"""A search from start to choice: prepare the study (scan, space, warm starts), run trials (one worker or
many), then choose the plan and write its record.

    prepare(cfg, paths)          -> Session   (any worker may call it; it is idempotent)
    work(session, max_trials)    -> trials run by this worker
    summarize(session, out)      -> the choice, with plan.json, trials table, Pareto and efficiency plots
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tasks.config import PipelineConfig
from tasks.devices import registry_of
from tasks.errors import ConfigError, StageError
from tasks.progress import say
from tasks.search import study as st
from tasks.search.space import SearchSpace
from tasks.search.trial import LatencyCache, TrialRunner
from tasks.workspace import RunPaths, list_runs, read_json, write_json


@dataclass
class Session:
    cfg: PipelineConfig
    paths: RunPaths
    space: SearchSpace
    study: optuna.Study
    runner: TrialRunner
    url: str
    sensitivity: dict[str, Any] | None


def shared_dir(paths: RunPaths) -> Path:
    """Files every worker of the run reads (the sensitivity scan); outside the stage's atomic folder."""
    return paths.run_dir / "search_shared"


# Ops that round weights to fewer bits: the weight-bits scan is of use only to plans that have one.
WEIGHT_BIT_OPS = ("quantize_int8", "qat", "kmeans")
MIN_SCAN_IMAGES = 250


def sensitivity_wanted(cfg: PipelineConfig) -> tuple[bool, str]:
    """Whether this run scans sensitivity, and why (enabled: auto scans when the search will read it)."""
    enabled = cfg.compression.sensitivity.enabled
    if enabled is True:
        return True, "compression.sensitivity.enabled: true"
    if enabled is False:
        return False, "compression.sensitivity.enabled: false"
    if cfg.search.n_trials == 0:
        return False, "no search reads it (search.n_trials: 0); set compression.sensitivity.enabled: true to scan anyway"
    return True, "the search shapes its per-group ratios and first trial by it"


def sensitivity_scan(cfg: PipelineConfig, model, splits, data) -> dict[str, Any]:
    """Prune each pruning group's root alone, and round each layer's weights alone (when the plan quantizes),
    on as many validation images as compression.sensitivity.budget_s allows (at least 250, at most val_images)."""
    import time

    from compression_ops import evaluate
    from compression_ops.sensitivity import (
        prune_roots,
        prune_sensitivity,
        weight_bits_sensitivity,
        weight_layers,
    )

    sc = cfg.compression.sensitivity
    ops = {e["op"] for e in cfg.compression.plan}
    roots = prune_roots(model, data.example) if "channel_prune" in ops else []
    bit_layers = weight_layers(model) if ops & set(WEIGHT_BIT_OPS) else []
    evaluations = 1 + len(roots) * len(sc.prune_ratios) + len(bit_layers) * len(sc.weight_bits)
    x, y = splits.tensors["val"]
    probe = min(len(y), MIN_SCAN_IMAGES)
    t0 = time.perf_counter()
    evaluate(model, [(x[:probe], y[:probe])])
    per_image = (time.perf_counter() - t0) / max(probe, 1)
    # the budget's images per evaluation; pruning a copy costs about one probe evaluation more
    fit = int(sc.budget_s / max(evaluations, 1) / max(per_image, 1e-9)) - probe
    n = min(sc.val_images, len(y), max(fit, MIN_SCAN_IMAGES))
    val = [(x[i : min(i + 500, n)], y[i : min(i + 500, n)]) for i in range(0, n, 500)]

    def accuracy(m) -> float:
        return evaluate(m, val)["accuracy"]

    t0 = time.perf_counter()
    scans = []
    if roots:
        scans.append(prune_sensitivity(model, data, accuracy, sc.prune_ratios, layers=roots))
    if bit_layers:
        scans.append(weight_bits_sensitivity(model, accuracy, sc.weight_bits, layers=bit_layers))
    return {"val_images": n, "evaluations": evaluations, "seconds": round(time.perf_counter() - t0, 2), "scans": scans}


def load_or_scan_sensitivity(cfg: PipelineConfig, paths: RunPaths, model, splits) -> dict[str, Any] | None:
    from compression_ops import OpData
    from tasks.plots import plot_sensitivity

    wanted, why = sensitivity_wanted(cfg)
    if not wanted:
        say(f"sensitivity: not scanned ({why})")
        return None
    path = shared_dir(paths) / "sensitivity.json"
    paths.pull(path.parent.name)  # another worker's scan, with an object-store workspace
    if path.is_file():
        return read_json(path)
    data = OpData(example=splits.example(1), batches=splits.batches("train", 64, train=True, seed=1), max_batches=8)
    sens = sensitivity_scan(cfg, model, splits, data)
    write_json(path, sens)
    plot_sensitivity(sens["scans"], path.with_suffix(".png"), title=f"{cfg.name}: layer sensitivity (no fine-tuning)")
    paths.publish(path.parent.name)
    say(f"sensitivity: {sens['evaluations']} evaluations on {sens['val_images']} validation images in "
        f"{sens['seconds']:.0f} s ({why})")
    prune_scan = next((sc for sc in sens["scans"] if sc["kind"] == "channel_prune"), None)
    worst = max(prune_scan["rows"], key=lambda r: r["drop"], default=None) if prune_scan else None
    if worst:
        say(f"sensitivity: most sensitive to pruning is {worst['layer']} ({worst['drop']:+.2f} pt at ratio {worst['setting']})")
    return sens


def previous_best(paths: RunPaths) -> dict[str, Any] | None:
    """The chosen point of this pipeline's latest earlier run that searched (nightly warm start)."""
    for r in reversed(list_runs(paths.root)):
        if r.pipeline != paths.pipeline or r.run_id == paths.run_id:
            continue
        f = r.stage_dir("search") / "choice.json"
        if f.is_file():
            choice = read_json(f)
            if choice.get("point"):
                return {"run_id": r.run_id, "point": choice["point"]}
    return None


def prepare(cfg: PipelineConfig, paths: RunPaths, *, worker: int = 0, tracker: bool = True) -> Session:
    """Load the base and data, scan sensitivity (once per run), open the study, queue the warm starts."""
    from tasks import tracking
    from tasks.context import StageContext
    from tasks.models.checkpoint import load_checkpoint

    url = st.storage_url(cfg.search, paths)
    if cfg.search.workers > 1 and url.startswith("sqlite"):
        raise ConfigError(
            f"pipeline {cfg.name!r}: search.workers={cfg.search.workers} share one study, and the default "
            "storage is SQLite in the workspace, which workers on other machines cannot reach: set search.storage "
            "(or $SHRINKFLOW_OPTUNA_STORAGE) to postgresql+psycopg2://user@host:5432/db"
        )
    ctx = StageContext(cfg=cfg, paths=paths, tracker=None)  # type: ignore[arg-type]
    base, _ = load_checkpoint(paths.require("train_base", "model.pt"))
    splits = ctx.splits()
    SearchSpace(cfg, base, splits.example(1), None)  # a bad search.space fails now, not after the scan
    sens = load_or_scan_sensitivity(cfg, paths, base, splits)
    space = SearchSpace(cfg, base, splits.example(1), sens)
    trials_tracker = None
    if tracker:
        with st.claim_lock(url, f"{st.study_name(paths)}:mlflow"):  # one search run, however many workers start
            trials_tracker = tracking.TrialTracker(paths, tracking.stage_run_id(paths, "search"))
    latency = LatencyCache(paths.root / "cache" / f"latency-{cfg.goal.device}.json", cfg.goal.device,
                           registry_of(cfg))
    runner = TrialRunner(cfg, base, splits, space, latency, tracker=trials_tracker, worker=worker)
    study = st.open_study(cfg.search, paths, runner.directions, worker)
    session = Session(cfg, paths, space, study, runner, url, sens)
    if cfg.search.n_trials:
        _warm_start(session)
    return session


def warm_start_points(space: SearchSpace, previous: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(source, searched values) the study tries first, in order: the previous run's best, the
    sensitivity-shaped plan, and the plan as written with every searched value at its default (the
    uniform cut a run without the search makes), so the search never chooses without having scored
    the plan it replaces. Repeats are dropped."""
    points = []
    if previous:
        points.append(("previous_run:" + previous["run_id"], space.restrict(previous["point"])))
    shaped = space.sensitivity_shaped()
    if shaped:
        points.append(("sensitivity", shaped))
    points.append(("default", space.defaults()))
    out: list[tuple[str, dict[str, Any]]] = []
    for source, point in points:
        searched = {k: v for k, v in point.items() if not space.params[k].is_fixed}
        if searched and all(searched != p for _, p in out):
            out.append((source, searched))
    return out


def _warm_start(s: Session) -> None:
    with st.quiet_optuna(), st.claim_lock(s.url, s.study.study_name):
        if s.study.user_attrs.get(st.ATTR_WARM):
            return
        queued = warm_start_points(s.space, previous_best(s.paths)) if s.cfg.search.warm_start else []
        for source, point in queued[: s.cfg.search.n_trials]:
            s.study.enqueue_trial(point, user_attrs={"warm_start": source}, skip_if_exists=True)
        s.study.set_user_attr(st.ATTR_WARM, [q[0] for q in queued])
    if queued:
        say(f"search: warm start from {', '.join(q[0] for q in queued)}")


def work(s: Session, max_trials: int | None = None, deadline: float | None = None) -> int:
    """Claim and run trials until the study's budget (or this worker's share, or the timeout) is spent."""
    sc = s.cfg.search
    if deadline is None and sc.timeout_minutes:
        deadline = time.time() + 60 * sc.timeout_minutes
    done = 0
    while max_trials is None or done < max_trials:
        if deadline is not None and time.time() > deadline:
            say(f"search worker {s.runner.worker}: timeout ({sc.timeout_minutes} min) reached")
            break
        trial = st.claim_trial(s.study, sc, s.url)
        if trial is None:
            break
        with st.quiet_optuna(), st.Heartbeat(s.study, trial, sc.heartbeat_seconds), st.deferred_interrupt():
            try:
                s.runner.run(s.study, trial)
            except KeyboardInterrupt:
                st.requeue(s.study, trial)  # interrupted: the next run of the stage starts with this point
                raise
        done += 1
        ft = s.study._storage.get_trial(trial._trial_id)
        acc = ft.values[0] if ft.values else None
        say(f"trial {trial.number} ({ft.state.name.lower()}): "
            + (f"val {acc:.2f}%" if acc is not None else ft.user_attrs.get("error", "no score"))
            + f", {ft.user_attrs.get('seconds', 0):.0f} s")
    return done


def finish(s: Session) -> int:
    """Run what is left of the budget, wait for other workers, and run again what a dead worker left
    (its stale trial comes back queued); returns the trials run here."""
    ran = 0
    deadline = time.time() + 60 * s.cfg.search.timeout_minutes if s.cfg.search.timeout_minutes else None
    while True:
        ran += work(s, deadline=deadline)
        wait_for_workers(s)
        if not s.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return ran


def wait_for_workers(s: Session, poll: float | None = None) -> None:
    """Block while other workers still run trials; stale ones (dead workers) are failed and re-queued."""
    poll = poll or max(1.0, s.cfg.search.heartbeat_seconds / 2)
    while True:
        st.fail_stale(s.study)
        running = s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        time.sleep(poll)


# --- choosing ---------------------------------------------------------------------------------------

def meets_cost_limits(t: optuna.trial.FrozenTrial) -> bool:
    """A completed trial whose recorded goal violations are all <= 0 (what the choice keeps)."""
    return t.state == TrialState.COMPLETE and all(c <= 0 for c in st.constraints_of(t))


def _violation(t: optuna.trial.FrozenTrial) -> float:
    return sum(max(c, 0.0) for c in st.constraints_of(t))


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Non-dominated completed trials: higher accuracy, lower cost (values[1])."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and len(t.values) > 1]
    front = []
    for t in done:
        dominated = any(
            o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and (o.values[0] > t.values[0] or o.values[1] < t.values[1])
            for o in done
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.values[1])


def choose(s: Session) -> tuple[optuna.trial.FrozenTrial, str, bool]:
    """(trial, why, feasible): the user's pick, the best feasible trial, or the closest to the goal."""
    trials = s.study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    sc = s.cfg.search
    if sc.pick is not None:
        t = next((t for t in done if t.number == sc.pick), None)
        if t is None:
            have = ", ".join(str(t.number) for t in done) or "none"
            raise StageError(f"search.pick={sc.pick}: no completed trial with that number (completed: {have})")
        return t, f"trial {t.number}, picked in search.pick", meets_cost_limits(t)
    if not done:
        errors = sorted({t.user_attrs.get("error", t.state.name) for t in trials})
        raise StageError(
            f"search: none of {len(trials)} trials completed, so there is no plan to keep. Reasons: "
            + "; ".join(errors[:5]) + ". Relax the goal in pipelines.yaml or widen search.space."
        )
    pool = pareto_front(done) if s.space.multi_objective else done
    feasible = [t for t in pool if meets_cost_limits(t)] or [t for t in done if meets_cost_limits(t)]
    if feasible:
        best = max(feasible, key=lambda t: t.values[0])
        return best, f"the most accurate of {len(feasible)} trials meeting the goal's cost limits", True
    closest = min(done, key=lambda t: (_violation(t), -t.values[0]))
    names = closest.user_attrs.get("constraint_names", [])
    missed = ", ".join(f"{n} (off by {c:.0%})" for n, c in zip(names, st.constraints_of(closest), strict=False) if c > 0)
    return closest, f"NO trial met the goal; kept the closest, trial {closest.number}, which misses {missed}", False


def trial_rows(s: Session) -> list[dict[str, Any]]:
    rows = []
    for t in s.study.get_trials(deepcopy=False):
        m = t.user_attrs.get("metrics", {})
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "worker": t.user_attrs.get("worker"),
            "warm_start": t.user_attrs.get("warm_start", ""),
            "seconds": t.user_attrs.get("seconds"),
            "val_accuracy": m.get("val_accuracy"),
            "macs": m.get("macs"),
            "macs_reduction": m.get("macs_reduction"),
            "size_mb": m.get("size_mb"),
            "latency_ms": m.get("latency_ms"),
            "latency_reduction": m.get("latency_reduction"),
            "feasible": meets_cost_limits(t),
            "constraints": t.user_attrs.get("constraints"),
            "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
            "train_images": t.user_attrs.get("train_images", 0),
            "error": t.user_attrs.get("error", ""),
            "params": t.params,
        })
    return rows


def efficiency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best feasible validation accuracy after each trial (by trial number)."""
    best, out = -math.inf, []
    for r in sorted(rows, key=lambda r: r["trial"]):
        if r["feasible"] and r["val_accuracy"] is not None:
            best = max(best, r["val_accuracy"])
        out.append({"trial": r["trial"], "best_feasible_val_accuracy": None if best == -math.inf else best})
    return out


def _close_stale_runs(s: Session) -> None:
    """MLflow runs of trials whose worker died stay RUNNING: end them FAILED, as their trials are."""
    if s.runner.tracker is None:
        return
    client = s.runner.tracker.client
    for t in s.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        rid = t.user_attrs.get("mlflow_run_id")
        if rid and client.get_run(rid).info.status == "RUNNING":
            client.set_tag(rid, "trial_state", "STALE")
            client.set_terminated(rid, "FAILED")


def summarize(s: Session, out: Path) -> dict[str, Any]:
    """Choose the plan and write: plan.json, choice.json, trials.json/.csv, pareto.png, efficiency.json/.png."""
    import csv

    from tasks.plan import plan_to_json
    from tasks.plots import plot_efficiency, plot_pareto

    wait_for_workers(s)
    _close_stale_runs(s)
    chosen, why, feasible = choose(s)
    rows = trial_rows(s)
    point = {**s.space.defaults(), **chosen.params}
    plan, ft = s.space.build(point)
    plan_json = plan_to_json(plan)
    metrics = chosen.user_attrs.get("metrics", {})
    choice = {
        "trial": chosen.number,
        "why": why,
        "feasible": feasible,
        "point": point,
        "plan": plan_json,
        "finetune": ft,
        "metrics": metrics,
        "search_accuracy_drop_within_goal": metrics.get("val_accuracy_drop", math.inf) <= s.cfg.goal.max_accuracy_drop,
        "study": s.study.study_name,
        "storage": s.url.split("@")[-1] if "@" in s.url else s.url,
        "space": [p.describe() for p in s.space.params.values()],
        "warm_starts": s.study.user_attrs.get(st.ATTR_WARM, []),
        # what the search cost in training, for comparisons at equal budget (the finetune stage adds its own)
        "budget": {"trials": len(rows), "train_images": sum(int(r["train_images"] or 0) for r in rows)},
    }
    write_json(out / "plan.json", plan_json)
    write_json(out / "choice.json", choice)
    write_json(out / "trials.json", rows)
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k not in ("params", "constraints")] + ["params"])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: v for k, v in r.items() if k != "constraints"}, "params": repr(r["params"])})
    eff = efficiency(rows)
    write_json(out / "efficiency.json", eff)
    cost = s.runner.cost_metric()
    plot_pareto(rows, out / "pareto.png", cost=cost, chosen=chosen.number, title=f"{s.cfg.name}: {len(rows)} trials")
    plot_efficiency({s.cfg.search.sampler: eff}, out / "efficiency.png",
                    title=f"{s.cfg.name}: best feasible validation accuracy by trial")
    return choice
