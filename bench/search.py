"""Automated search vs a hand-set uniform ratio vs random search, on the Fashion-MNIST ResNet-8 at 5x and
9x fewer MACs; every method gets the same final fine-tune.

    python bench/search.py                                    # 5x and 9x, 15 trials each (about an hour)
    python bench/search.py --targets 5 --trials 6 --final-epochs 1 --train-subset 2000   # a quick look

For each MACs target:
  uniform  ChannelPrune(target_macs_reduction=T): one ratio for every layer (the hand-set baseline).
  search   the product's search: TPE over per-group pruning multipliers (the bisection keeps every point
           at exactly T), distillation temperature/weight and learning rate; warm-started from the
           sensitivity scan; median pruning over the trial epochs.
  random   the same space and trial protocol, RandomSampler, no warm start.
Each trial fine-tunes (KD) for --trial-epochs on --train-subset training images and is scored on
--val-images validation images (never test). The uniform plan is scored the same way, once, as the
reference line. Then each method's best plan (uniform: its only plan) gets the same final KD fine-tune
(--final-epochs on the full training split) and is scored on the test set.

Prints the table; writes bench/results/search.json and search_efficiency.png/.json beside it (best
feasible validation accuracy vs trial, both searches, uniform as a reference line).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

# isort: off
from common import RESULTS, base_model, fashion_splits, say  # first: sets the thread env before torch loads
# isort: on
import optuna

from compression_ops import ChannelPrune, Distill, OpData, TrainSpec, apply, evaluate, fit
from compression_ops.metrics import count_macs
from tasks.config import PipelineConfig
from tasks.plots import plot_efficiency
from tasks.search import study as st
from tasks.search.runner import efficiency, sensitivity_scan
from tasks.search.space import SearchSpace
from tasks.search.trial import LatencyCache, TrialRunner


def pipeline(target: float, args: argparse.Namespace, sampler: str) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": f"bench_{target:g}x",
        "data": {"source": "fashion_mnist"},
        "model": {"name": "resnet8", "kwargs": {"width": 16}},
        "train": {"augment": True},
        "goal": {"speedup": target, "metric": "macs", "max_accuracy_drop": 100},
        "compression": {"plan": [{"op": "channel_prune", "importance": "l2"}]},
        "finetune": {"epochs": args.final_epochs, "lr": 0.02, "batch_size": 128,
                     "distill": {"temperature": 4.0, "alpha": 0.7}},
        "search": {"n_trials": args.trials, "sampler": sampler, "trial_epochs": args.trial_epochs,
                   "train_subset": args.train_subset, "val_images": args.val_images, "pruner": "median",
                   "seed": args.seed},
    })


def run_search(cfg: PipelineConfig, base, sp, sens, warm: bool) -> tuple[list[dict[str, Any]], dict[str, Any], TrialRunner]:
    space = SearchSpace(cfg, base, sp.example(1), sens)
    runner = TrialRunner(cfg, base, sp, space, LatencyCache(RESULTS / ".unused-latency.json"))
    study = optuna.create_study(directions=runner.directions, sampler=st.sampler_for(cfg.search, 0),
                                pruner=st.pruner_for(cfg.search))
    if warm and (shaped := space.sensitivity_shaped()):
        study.enqueue_trial({k: v for k, v in shaped.items() if not space.params[k].is_fixed},
                            user_attrs={"warm_start": "sensitivity"})
    rows = []
    for _ in range(cfg.search.n_trials):
        trial = study.ask()
        runner.run(study, trial)
        t = study.trials[trial.number]
        m = t.user_attrs.get("metrics", {})
        rows.append({"trial": t.number, "state": t.state.name, "val_accuracy": m.get("val_accuracy"),
                     "macs_reduction": m.get("macs_reduction"), "seconds": t.user_attrs.get("seconds"),
                     "feasible": t.state.name == "COMPLETE" and all(c <= 0 for c in t.user_attrs.get("constraints", [1])),
                     "params": t.params, "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch")})
        say(f"  {cfg.search.sampler} trial {t.number}: {t.state.name.lower()} "
            f"val {m.get('val_accuracy', float('nan')):.2f}% ({t.user_attrs.get('seconds', 0):.0f} s)")
    feasible = [r for r in rows if r["feasible"]]
    best = max(feasible, key=lambda r: r["val_accuracy"])
    point = {**space.defaults(), **best["params"]}
    return rows, point, runner


def trial_score(runner: TrialRunner, point: dict[str, Any]) -> float:
    """The uniform plan under the trial protocol: its reference line on the efficiency curve."""
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({k: v for k, v in point.items() if not runner.space.params[k].is_fixed})
    trial = study.ask()
    runner.run(study, trial)
    return study.trials[0].user_attrs["metrics"]["val_accuracy"]


def final(cfg: PipelineConfig, base, sp, plan_ops: list, lr: float, distill: Distill, epochs: int) -> dict[str, Any]:
    """The same full fine-tune for every method; test accuracy of the result."""
    t0 = time.perf_counter()
    data = OpData(example=sp.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=8)
    model = copy.deepcopy(base)
    for op in plan_ops:
        model = apply(model, op, data).model
    fit(model, sp.batches("train", 128, train=True, augment=True, seed=2), TrainSpec(epochs=epochs, lr=lr),
        teacher=base, distill=distill)
    return {"test_accuracy": evaluate(model, sp.batches("test"))["accuracy"],
            "val_accuracy": evaluate(model, sp.batches("val"))["accuracy"],
            "macs_reduction": count_macs(base, sp.example(1)) / count_macs(model, sp.example(1)),
            "final_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="5,9")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--trial-epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--final-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "search.json"))
    args = ap.parse_args()
    sp = fashion_splits()
    base, meta = base_model("resnet8", sp)
    base.eval()
    say(f"base resnet8: test {meta['test_accuracy']:.2f}%")
    t0 = time.perf_counter()
    cfg0 = pipeline(5.0, args, "tpe")
    data = OpData(example=sp.example(1), batches=sp.batches("train", 64, train=True, seed=1), max_batches=8)
    sens = sensitivity_scan(cfg0, base, sp, data)
    say(f"sensitivity scan: {time.perf_counter() - t0:.0f} s")
    results: dict[str, Any] = {"base_test_accuracy": meta["test_accuracy"], "args": vars(args), "targets": {}}
    curves: dict[str, list] = {}
    refs: dict[str, float] = {}
    for target in [float(t) for t in args.targets.split(",")]:
        say(f"== {target:g}x fewer MACs")
        res: dict[str, Any] = {}
        methods = {}
        for sampler, warm in (("tpe", True), ("random", False)):
            cfg = pipeline(target, args, sampler)
            if sampler == "random":  # its own seed: TPE's startup points are random draws from the same seed
                cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"seed": args.seed + 1})})
            t1 = time.perf_counter()
            rows, point, runner = run_search(cfg, base, sp, sens, warm)
            methods["search" if sampler == "tpe" else "random"] = (cfg, rows, point, runner, time.perf_counter() - t1)
        cfg, _, _, runner, _ = methods["search"]
        uniform_point = {**runner.space.defaults(), **{f"prune.scale.{g[0]}": 1.0 for g in runner.space.groups}}
        uniform_val = trial_score(runner, uniform_point)
        say(f"  uniform plan under the trial protocol: val {uniform_val:.2f}%")
        refs[f"uniform {target:g}x"] = uniform_val
        for name, (cfg, rows, point, runner, secs) in methods.items():
            plan, ft = runner.space.build(point)
            eff = efficiency(rows)
            reached = next((e["trial"] + 1 for e in eff if (e["best_feasible_val_accuracy"] or -1) >= uniform_val), None)
            curves[f"{name} {target:g}x"] = eff
            say(f"  {name}: final fine-tune of the chosen plan")
            res[name] = {"trials": rows, "point": point, "search_seconds": round(secs, 1), "efficiency": eff,
                         "best_trial_val_accuracy": max(r["val_accuracy"] for r in rows if r["feasible"]),
                         "trials_to_reach_uniform": reached,
                         **final(cfg, base, sp, plan[:-1], ft["lr"], plan[-1], args.final_epochs)}
        u_ops = [ChannelPrune(target_macs_reduction=target, importance="l2")]
        say("  uniform: final fine-tune")
        res["uniform"] = {"trial_protocol_val_accuracy": uniform_val,
                          **final(cfg, base, sp, u_ops, 0.02, Distill(temperature=4.0, alpha=0.7), args.final_epochs)}
        results["targets"][f"{target:g}"] = res
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    plot_efficiency(curves, args.out.replace(".json", "_efficiency.png"), reference=refs,
                    title="ResNet-8 / Fashion-MNIST: best feasible val accuracy by trial")
    with open(args.out.replace(".json", "_efficiency.json"), "w") as f:
        json.dump({"curves": curves, "uniform_reference": refs}, f, indent=1)
    base_acc = meta["test_accuracy"]
    print(f"\nbase test accuracy {base_acc:.2f}%; final fine-tune {args.final_epochs} epochs KD for every method; "
          f"{args.trials} trials of {args.trial_epochs} epochs on {args.train_subset} images")
    print(f"{'target':>6} {'method':8} {'test %':>7} {'drop':>6} {'MACs':>6} {'best trial val':>14} {'reach unif.':>11} {'search s':>8}")
    for t, res in results["targets"].items():
        for name in ("uniform", "search", "random"):
            r = res[name]
            print(f"{t + 'x':>6} {name:8} {r['test_accuracy']:7.2f} {base_acc - r['test_accuracy']:+6.2f} "
                  f"{r['macs_reduction']:5.2f}x {r.get('best_trial_val_accuracy', r.get('trial_protocol_val_accuracy')):14.2f} "
                  f"{str(r.get('trials_to_reach_uniform', '-')):>11} {r.get('search_seconds', 0):8.0f}")
    say(f"done in {time.perf_counter() - t0:.0f} s; {args.out}")


if __name__ == "__main__":
    with st.quiet_optuna():
        main()
