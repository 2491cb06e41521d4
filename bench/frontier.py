"""The accuracy frontier at high compression: shrinkflow against Torch-Pruning's own recipes, on the same
trained bases, at the same MACs reductions and the same total training budget, side by side in one run.

    .venv/bin/python bench/frontier.py [--nets resnet8_w16 resnet10_wide] [--ratios 2 3 5 9]
        [--methods ...] [--budget 3] [--train-fraction 1.0] [--base-epochs 15] [--noise-seeds 3]
        [--device cpu] [--no-latency] [--data-dir DIR] [--out bench/results/frontier.json]
    .venv/bin/python bench/frontier.py --merge RUN.json [RUN.json ...] --out MERGED.json

Data: Fashion-MNIST (Debian's dataset-fashion-mnist, or the four idx .gz files in --data-dir), the
official 60k/10k split; accuracy is on the whole 10k test set. Bases: trained here once (15 epochs, the
demo's recipe) and cached under .shrinkflow/bench/frontier/ (as CPU state dicts, whichever device trained
them). Device: --device cuda trains (bases, sparse and regularised epochs, fine-tunes, Taylor gradients)
and scores accuracy on the GPU, and cuts there too; batches are read and augmented on the CPU as on a
CPU run (same order), so only the arithmetic differs. Latency is always measured on the CPU, on CPU
copies of the models (--no-latency skips it, and the plot's latency panel); bench/frontier_gpu.sh runs
the bench on a GPU machine that lacks our venv.

Each method gets `--budget` epochs over the training set in all (its sparse training before the cut
counts), fine-tunes with the same SGD + cosine schedule at the same lr, and is cut to the same MACs as
the others (the uniform ratio solved for the target; Torch-Pruning's MetaPruner reads the ratio the same
way).

Methods (each is what its authors' recipe does, scaled to the budget):
  sf_default      shrinkflow's default plan: channel_prune (l2, ratio solved for the target), KD fine-tune
  sf_grow         channel_prune with regularize: grow (1 epoch of growing regularisation on the channels
                  the cut removes, distilling from the base), then KD fine-tune for the rest
  sf_grow_lr01    sf_grow, fine-tuned at lr 0.01 (keeps more of the cut's head start)
  sf_group_lasso  channel_prune with regularize: group_lasso (1 epoch), then KD fine-tune
  sf_iterative    channel_prune in 2 steps (steps: 2) with 1 KD epoch between, then KD fine-tune
  sf_attention    sf_default with attention transfer at the stage ends (attention_weight 1000)
  sf_kd03         sf_default with the KD term's weight at 0.3 (default 0.7)
  sf_ce           shrinkflow's cut, fine-tuned with cross-entropy alone (no teacher)
  sf_kd_decay     sf_default with the KD weight falling linearly from 0.7 to 0 (labels alone at the end)
  sf_search       shrinkflow with the search (tasks.search, as a pipeline with search.n_trials runs it):
                  1 epoch of the budget in short trials (each on 1/16 of the training set, scored on 2000
                  images held out of it) choosing the per-group shape, regularize / steps /
                  global_ranking, the KD temperature and weight and the lr; the winner is cut from the
                  base and fine-tuned for the rest of the budget
  tp_l1           uniform L1 (MetaPruner + MagnitudeImportance(p=1)), cross-entropy fine-tune: the
                  20-line recipe
  tp_magnitude    MetaPruner + GroupMagnitudeImportance(p=2), cross-entropy fine-tune
  tp_taylor       MetaPruner + GroupTaylorImportance (gradients of 8 batches), cross-entropy fine-tune
  tp_group_norm   GroupNormPruner: 1 epoch of its sparse training (reg 5e-4, its benchmark's), prune,
                  cross-entropy fine-tune
  tp_bn_scale     BNScalePruner: 1 epoch of its sparse training (reg 1e-5), prune, cross-entropy fine-tune
  tp_growing_reg  GrowingRegPruner: 1 epoch of its growing regularisation, prune, cross-entropy fine-tune

Noise: sf_default at 5x on the first net is run with --noise-seeds seeds; their spread is the bar a
lead must clear. Latency: batch 1, one thread, the best of PyTorch eager and ONNX Runtime (fp32) per
model, timed interleaved with the base. "cut %" is the test accuracy right after the cut, before any
fine-tuning. Prints a table, writes the JSON (--out; rewritten after every finished row, atomically, so
a run cut short keeps what it finished: "finished" says whether it ran to the end) and a plot of the
same name (.png).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from compression_ops import ChannelPrune, Distill, OpData, TrainSpec, apply, evaluate, fit  # noqa: E402
from compression_ops.channel_prune import output_layers, solve_ratio  # noqa: E402
from compression_ops.metrics import count_macs, count_params  # noqa: E402
from tasks.config import DataConfig  # noqa: E402
from tasks.data.dataset import normalization  # noqa: E402
from tasks.data.loaders import TensorBatches, to_tensor  # noqa: E402
from tasks.data.sources import fashion_mnist  # noqa: E402
from tasks.errors import DatasetError  # noqa: E402
from tasks.models import create_model  # noqa: E402
from tasks.workspace import write_json  # noqa: E402  (atomic: a run killed mid-write keeps the last version)

CACHE = REPO / ".shrinkflow" / "bench" / "frontier"
NETS: dict[str, Callable[[], nn.Module]] = {
    "resnet8_w16": lambda: create_model("resnet8", in_channels=1, num_classes=10, width=16),
    "resnet10_wide": lambda: create_model("resnet10_wide", in_channels=1, num_classes=10),
}
BATCH, FINETUNE_LR, BASE_LR = 128, 0.05, 0.2


# ------------------------------------------------------------------ data and bases


def fashion(train_fraction: float, data_dir: Path | None = None) -> tuple[TensorBatches, TensorBatches, torch.Tensor]:
    """(augmented shuffled train batches, test batches, one example image) of Fashion-MNIST, read and
    normalised as the pipelines do (tasks.data: the fashion_mnist source, the training set's mean/std).
    The tensors stay on the CPU: fit() and evaluate() move each batch to the model's device."""
    try:
        cfg = DataConfig(source="fashion_mnist", path=str(data_dir) if data_dir else None)
        x_train, y_train, x_test, y_test, *_ = fashion_mnist(cfg)
    except DatasetError as e:
        raise SystemExit(str(e)) from None
    mean, std = normalization(x_train)
    xtr, ytr = to_tensor(x_train, mean, std), torch.from_numpy(y_train)
    xte, yte = to_tensor(x_test, mean, std), torch.from_numpy(y_test)
    n = int(len(ytr) * train_fraction)
    keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))[:n]
    train = TensorBatches(xtr[keep], ytr[keep], BATCH, shuffle=True, augment=True, seed=0)
    return train, TensorBatches(xte, yte, 512), xtr[keep][:1]


def accuracy(model: nn.Module, batches: TensorBatches) -> float:
    return evaluate(model, batches)["accuracy"]


def trained_base(net: str, train: TensorBatches, test: TensorBatches, epochs: int, fraction: float,
                 device: torch.device) -> tuple[nn.Module, float]:
    """The trained base on `device`: from the cache (CPU state dicts, so any device reads them) or trained."""
    path = CACHE / f"{net}-e{epochs}-f{fraction:g}.pt"
    model = NETS[net]()  # initialised on the CPU: the same weights whatever the device
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.to(device)
    else:
        t0 = time.perf_counter()
        model.to(device)
        fit(model, train, TrainSpec(epochs=epochs, lr=BASE_LR, schedule="onecycle", label_smoothing=0.05))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(path)
        print(f"  trained {net} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model.eval(), accuracy(model, test)


# ------------------------------------------------------------------ methods


class Ctx:
    """What every method gets: the base, the MACs target and its solved ratio, the data, the budget."""

    def __init__(self, base: nn.Module, target: float, ratio: float, train: TensorBatches, test: TensorBatches,
                 example: torch.Tensor, budget: int, seed: int):
        self.base, self.target, self.ratio, self.train, self.test = base, target, ratio, train, test
        self.example, self.budget, self.seed = example, budget, seed
        self.after_cut: float | None = None  # test accuracy right after the cut, before fine-tuning
        self.search: dict[str, Any] | None = None  # sf_search: what the search ran and chose

    def spec(self, epochs: int) -> TrainSpec:
        return TrainSpec(epochs=epochs, lr=FINETUNE_LR, seed=self.seed)

    def calib(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """8 training batches, on the base's device."""
        dev = self.example.device
        return [(x.to(dev), y.to(dev)) for _, (x, y) in zip(range(8), self.train, strict=False)]


def _shrinkflow(regularize: str | None = None, *, lr: float = FINETUNE_LR, steps: int = 1, attention: float = 0.0,
                alpha: float | None = None, alpha_decay: bool = False) -> Callable[[Ctx], tuple[nn.Module, float]]:
    """alpha: the KD term's weight (None: Distill's default, 0.7; 0: cross-entropy alone, no teacher)."""
    def run(c: Ctx) -> tuple[nn.Module, float]:
        inside = (1 if regularize else 0) + (steps - 1)  # epochs the op trains: regularising, between cuts
        cfg = ChannelPrune(target_macs_reduction=c.target, importance="l2", regularize=regularize,
                           steps=steps, step_epochs=1, step_lr=FINETUNE_LR)
        torch.manual_seed(c.seed)
        res = apply(c.base, cfg, OpData(example=c.example, batches=c.train))
        model = res.model
        c.after_cut = accuracy(model, c.test)
        spec = TrainSpec(epochs=c.budget - inside, lr=lr, seed=c.seed)
        kd = None if alpha == 0 else Distill(attention_weight=attention, alpha_decay=alpha_decay,
                                             **({} if alpha is None else {"alpha": alpha}))
        fit(model, c.train, spec, teacher=c.base if kd else None, distill=kd)
        return model, res.report["train_epochs"] + spec.epochs

    return run


class _SearchSplits:
    """What tasks.search's TrialRunner reads of a pipeline's Splits: train and val tensors, an example."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 example: torch.Tensor):
        self.tensors, self._example = {"train": train, "val": val}, example

    def example(self, batch: int = 1) -> torch.Tensor:
        return self._example[:batch]


def _search(epochs: int = 1, max_trials: int = 16, val_images: int = 2000) -> Callable[[Ctx], tuple[nn.Module, float]]:
    """shrinkflow with the search, as a pipeline with `search.n_trials` runs it (tasks.search: the same
    space, sensitivity scan, warm start (the scan's shape, then the uniform cut), TPE sampler, trial runner and choice), in `epochs` of the budget.

    The plan is a bare channel_prune with regularize, steps and global_ranking left to the search, so it
    chooses the per-group shape, whether to regularise or cut in two steps, the KD temperature and weight
    and the fine-tune lr. Trials train on subsets of the training set (1/16 of `epochs` of it each) and
    are scored on `val_images` held out of it; the test set is never seen. A trial's cost is its training
    images, its ops' own epochs included (tasks.search's accounting); trials start while the worst case
    (a regularised two-step trial) still fits in `epochs`, so the search never overdraws. The winner is
    cut from the base as sf_default's cut is, and fine-tuned with its KD settings and lr for the rest of
    the budget on the whole training set. A budget too short for both regularising and a two-step cut
    (each 1 epoch) with a fine-tune epoch left pins one step."""
    def run(c: Ctx) -> tuple[nn.Module, float]:
        import optuna

        from tasks.config import PipelineConfig
        from tasks.search.runner import meets_cost_limits, sensitivity_scan, warm_start_points
        from tasks.search.space import SearchSpace
        from tasks.search.study import quiet_optuna, sampler_for
        from tasks.search.trial import LatencyCache, TrialRunner

        x, y = c.train.x, c.train.y
        n = len(y)
        hold = torch.randperm(n, generator=torch.Generator().manual_seed(c.seed + 1))
        val, fit_idx = hold[:val_images], hold[val_images:]
        subset = n * epochs // 16
        cfg = PipelineConfig.model_validate({
            "name": "bench_search", "data": {"source": "fashion_mnist"}, "model": {"name": "bench"},
            "train": {"augment": c.train.augment, "batch_size": BATCH, "seed": c.seed},
            "goal": {"speedup": c.target, "metric": "macs", "max_accuracy_drop": 100.0},
            "compression": {"plan": [{"op": "channel_prune", "importance": "l2", "regularize": "search",
                                      "steps": "search", "global_ranking": "search"}]},
            "finetune": {"lr": FINETUNE_LR, "batch_size": BATCH},
            "search": {"n_trials": max_trials, "trial_epochs": 1, "train_subset": subset,
                       "val_images": val_images, "seed": c.seed,
                       # regularising and a second cut each train 1 epoch of the budget: both must leave
                       # a fine-tune epoch, else the second cut is off the table
                       "space": {} if c.budget - epochs - 2 >= 1 else {"prune.steps": 1}},
        })
        splits = _SearchSplits((x[fit_idx], y[fit_idx]), (x[val], y[val]), c.example)
        scan_data = OpData(example=c.example, batches=c.train, max_batches=8)
        sensitivity = sensitivity_scan(cfg, c.base, splits, scan_data)
        space = SearchSpace(cfg, c.base, c.example, sensitivity)
        with tempfile.TemporaryDirectory() as tmp:
            runner = TrialRunner(cfg, c.base, splits, space, LatencyCache(Path(tmp) / "latency.json"))
            with quiet_optuna():
                study = optuna.create_study(directions=runner.directions, sampler=sampler_for(cfg.search, 0))
                for _, point in warm_start_points(space, None):  # the scan's shape, then the uniform cut
                    study.enqueue_trial(point)
                spent, worst = 0, 3 * subset  # a regularised (1 epoch) two-step (1 more) trial: 3 subset epochs
                for _ in range(max_trials):
                    if spent + worst > epochs * n:
                        break
                    trial = study.ask()
                    runner.run(study, trial)
                    spent += int(study.trials[-1].user_attrs.get("train_images", 0))
        done = [t for t in study.trials if meets_cost_limits(t)]
        if not done:
            raise RuntimeError("search: no trial completed within the goal: "
                               + "; ".join(str(t.user_attrs.get("error", t.state.name)) for t in study.trials))
        best = max(done, key=lambda t: t.values[0])
        point = space.defaults() | best.params
        plan, ft = space.build(point)
        prune = next(p for p in plan if isinstance(p, ChannelPrune))
        kd = next(p for p in plan if isinstance(p, Distill))
        torch.manual_seed(c.seed)
        res = apply(c.base, prune, OpData(example=c.example, batches=c.train))
        c.after_cut = accuracy(res.model, c.test)
        c.search = {"trials": len(study.trials), "search_epochs": spent / n, "chosen_trial": best.number,
                    "chosen_val_accuracy": best.values[0], "chosen": {k: point[k] for k in point
                                                                       if not k.startswith("prune.scale.")},
                    "cut_train_epochs": int(res.report["train_epochs"])}
        inside = int(res.report["train_epochs"])
        spec = TrainSpec(epochs=c.budget - epochs - inside, lr=ft["lr"], seed=c.seed)
        if spec.epochs < 1:
            raise SystemExit(f"sf_search: budget {c.budget} leaves no fine-tune epoch after {epochs} of search "
                             f"and {inside} of the chosen cut's own training")
        fit(res.model, c.train, spec, teacher=c.base, distill=kd)
        return res.model, round(spent / n + inside + spec.epochs, 2)

    return run


def _tp_prune(c: Ctx, model: nn.Module, pruner_cls: str, importance: Any, **kw: Any) -> Any:
    import torch_pruning as tp

    return getattr(tp.pruner, pruner_cls)(
        model, c.example, importance=importance, pruning_ratio=c.ratio,
        ignored_layers=output_layers(model, c.example), **kw)


def _ce_sparse_epoch(c: Ctx, model: nn.Module, pruner: Any) -> None:
    """One epoch of cross-entropy training with the pruner's regulariser after every backward pass
    (Torch-Pruning's benchmark loop)."""
    opt = torch.optim.SGD(model.parameters(), lr=FINETUNE_LR, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(c.train))
    torch.manual_seed(c.seed)
    model.train()
    if hasattr(pruner, "update_regularizer"):
        pruner.update_regularizer()
    dev = c.example.device
    for i, (x, y) in enumerate(c.train):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pruner.regularize(model)
        opt.step()
        sched.step()
        if hasattr(pruner, "update_reg") and i % 10 == 0:  # the benchmark's --update-reg-interval
            pruner.update_reg()
    model.eval()


def _torch_pruning(kind: str) -> Callable[[Ctx], tuple[nn.Module, float]]:
    def run(c: Ctx) -> tuple[nn.Module, float]:
        import torch_pruning as tp

        model = copy.deepcopy(c.base)
        sparse = 0
        if kind == "l1":
            pruner = _tp_prune(c, model, "MetaPruner", tp.importance.MagnitudeImportance(p=1))
        elif kind == "magnitude":
            pruner = _tp_prune(c, model, "MetaPruner", tp.importance.GroupMagnitudeImportance(p=2))
        elif kind == "taylor":
            pruner = _tp_prune(c, model, "MetaPruner", tp.importance.GroupTaylorImportance())
            model.eval()
            model.zero_grad()
            for x, y in c.calib():
                F.cross_entropy(model(x), y).backward()
        elif kind == "group_norm":
            pruner = _tp_prune(c, model, "GroupNormPruner", tp.importance.GroupMagnitudeImportance(p=2), reg=5e-4)
        elif kind == "bn_scale":
            pruner = _tp_prune(c, model, "BNScalePruner", tp.importance.BNScaleImportance(), reg=1e-5)
        elif kind == "growing_reg":
            pruner = _tp_prune(c, model, "GrowingRegPruner", tp.importance.GroupMagnitudeImportance(p=2),
                               reg=1e-4, delta_reg=1e-5)
        else:
            raise ValueError(kind)
        if kind in ("group_norm", "bn_scale", "growing_reg"):
            _ce_sparse_epoch(c, model, pruner)
            sparse = 1
        pruner.step()
        model.zero_grad(set_to_none=True)
        c.after_cut = accuracy(model, c.test)
        fit(model, c.train, c.spec(c.budget - sparse))
        return model, c.budget

    return run


METHODS: dict[str, Callable[[Ctx], tuple[nn.Module, float]]] = {
    "sf_default": _shrinkflow(),
    "sf_grow": _shrinkflow("grow"),
    "sf_grow_lr01": _shrinkflow("grow", lr=0.01),
    "sf_group_lasso": _shrinkflow("group_lasso"),
    "sf_iterative": _shrinkflow(steps=2),
    "sf_attention": _shrinkflow(attention=1000.0),
    "sf_kd03": _shrinkflow(alpha=0.3),
    "sf_ce": _shrinkflow(alpha=0.0),
    "sf_kd_decay": _shrinkflow(alpha_decay=True),
    "sf_search": _search(),
    "tp_l1": _torch_pruning("l1"),
    "tp_magnitude": _torch_pruning("magnitude"),
    "tp_taylor": _torch_pruning("taylor"),
    "tp_group_norm": _torch_pruning("group_norm"),
    "tp_bn_scale": _torch_pruning("bn_scale"),
    "tp_growing_reg": _torch_pruning("growing_reg"),
}


# ------------------------------------------------------------------ latency


def latency_ms(models: dict[str, nn.Module], example: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per model: eager and ONNX Runtime fp32 median ms at batch 1 on one thread, timed interleaved; always
    on the CPU (models on another device are timed as CPU copies)."""
    from tasks.engines.onnx_runtime import export_onnx, load_onnx
    from tasks.engines.timing import time_interleaved

    models = {name: m if _on_cpu(m) else copy.deepcopy(m).cpu() for name, m in models.items()}
    torch.set_num_threads(1)
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    x = example[:1].cpu()
    xn = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            m = m.eval()
            fns[(name, "eager")] = lambda m=m: m(x)
            path = Path(tmp) / f"{name}.onnx"
            try:
                export_onnx(m, x, path, dynamic_batch=False)
                runner = load_onnx(path, threads=1, verify=False)
                fns[(name, "onnxruntime")] = lambda r=runner: r.run(xn)
            except Exception as e:  # an export failure costs this model its ORT figure, not the bench
                print(f"  {name}: no ONNX Runtime figure ({type(e).__name__}: {str(e)[:120]})")
        with torch.inference_mode():
            times = time_interleaved(fns, warmup=10, repeat=60)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out: dict[str, dict[str, float]] = {}
    for (name, engine), t in times.items():
        out.setdefault(name, {})[engine] = t["median_ms"]
    for row in out.values():
        row["best"] = min(row.values())
    return out


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


# ------------------------------------------------------------------ main


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 3, 5, 9])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budget", type=int, default=3, help="training epochs per method, sparse training included")
    ap.add_argument("--train-fraction", type=float, default=1.0)
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--noise-seeds", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where training and accuracy run (latency is always measured on the CPU)")
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                    help="measure CPU latency per model (eager and ONNX Runtime); --no-latency skips it")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="a folder holding Fashion-MNIST's four idx .gz files (default: Debian's, "
                         "/usr/share/datasets/fashion-mnist)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "frontier.json")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="no training: merge these runs' JSONs (same bases, same budget) into --out, with the "
                         "summary and the plot")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if args.budget < 2:
        raise SystemExit("--budget must be at least 2 epochs (sparse training takes 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    torch.manual_seed(0)
    train, test, example = fashion(args.train_fraction, args.data_dir)
    example = example.to(device)  # cuts, MACs counts and ratio solving run on the models' device
    rows: list[dict[str, Any]] = []
    noise: dict[str, Any] = {}
    bases: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()

    def result(finished: bool) -> dict[str, Any]:
        return {"dataset": "fashion_mnist", "train_images": len(train.y), "budget_epochs": args.budget,
                "base_epochs": args.base_epochs, **device_info(device), "latency": args.latency,
                "finished": finished, "bases": bases, "rows": rows, "noise": noise,
                "minutes": (time.perf_counter() - t_start) / 60,
                "command": "bench/frontier.py " + " ".join(sys.argv[1:])}

    print(f"Fashion-MNIST, {len(train.y)} training images, budget {args.budget} epochs per method, "
          f"on {device_info(device).get('device_name', args.device)}", flush=True)
    for net in args.nets:
        base, base_acc = trained_base(net, train, test, args.base_epochs, args.train_fraction, device)
        macs0, params0 = count_macs(base, example), count_params(base)
        bases[net] = {"accuracy": base_acc, "macs": macs0, "params": params0}
        write_json(args.out, result(False))
        print(f"\n{net}: base {base_acc:.2f}% ({params0 / 1e3:.0f} k params, {macs0 / 1e6:.1f} M MACs)", flush=True)
        print(f"  {'target':>6s} {'method':16s} {'MACs x':>7s} {'cut %':>7s} {'acc %':>7s} {'drop':>6s} {'epochs':>6s} "
              f"{'min':>5s}")
        models: dict[str, nn.Module] = {"base": base}
        for target in args.ratios:
            ratio = solve_ratio(base, ChannelPrune(target_macs_reduction=target), OpData(example=example), target)
            for method in args.methods:
                seeds = range(args.noise_seeds) if (method == "sf_default" and target == 5 and net == args.nets[0]) else [0]
                accs = []
                for seed in seeds:
                    t0 = time.perf_counter()
                    ctx = Ctx(base, target, ratio, train, test, example, args.budget, seed)
                    model, epochs = METHODS[method](ctx)
                    acc = accuracy(model, test)
                    accs.append(acc)
                    if seed == 0:
                        macs = count_macs(model, example)
                        row = {"net": net, "target": target, "method": method, "ratio": ratio,
                               "macs": macs, "macs_reduction": macs0 / macs, "params": count_params(model),
                               "accuracy": acc, "drop": base_acc - acc, "train_epochs": epochs,
                               "accuracy_after_cut": ctx.after_cut,
                               **({"search": ctx.search} if ctx.search else {}),
                               "minutes": (time.perf_counter() - t0) / 60}
                        rows.append(row)
                        models[f"{method}@{target:g}"] = model
                    print(f"  {target:5.0f}x {method:16s} {macs0 / count_macs(model, example):6.2f}x {ctx.after_cut:7.2f} "
                          f"{acc:7.2f} {base_acc - acc:6.2f} {epochs:6g} {(time.perf_counter() - t0) / 60:5.1f}", flush=True)
                if len(accs) > 1:
                    noise = {"net": net, "target": target, "method": method, "accuracies": accs,
                             "stdev": statistics.stdev(accs), "range": max(accs) - min(accs)}
                    print(f"  noise: sf_default at {target:g}x over {len(accs)} seeds: stdev {noise['stdev']:.2f} pt, "
                          f"range {noise['range']:.2f} pt", flush=True)
                write_json(args.out, result(False))
        base_row = {"net": net, "method": "base", "target": 1.0, "macs": macs0, "macs_reduction": 1.0,
                    "params": params0, "accuracy": base_acc, "drop": 0.0, "train_epochs": args.base_epochs}
        if args.latency:
            t0 = time.perf_counter()
            lat = latency_ms(models, example)
            for row in rows:
                if row["net"] == net:
                    row["latency_ms"] = lat[f"{row['method']}@{row['target']:g}"]
            base_row["latency_ms"] = lat["base"]
            print(f"  latency of {len(models)} models measured in {time.perf_counter() - t0:.0f} s", flush=True)
        rows.append(base_row)
        write_json(args.out, result(False))
    final = result(True)
    write_json(args.out, final)
    summary(final)
    plot(final, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


def merge(files: list[Path], out: Path) -> None:
    """Several runs' JSONs (e.g. bench/frontier_gpu_sweep.sh's, one per net and ratio, on the same bases and
    budget; a run cut short counts with the rows it finished) as one result: table, summary, JSON and plot."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    budgets = {r["budget_epochs"] for r in runs}
    if len(budgets) != 1:
        raise SystemExit(f"--merge: the runs have different budgets ({sorted(budgets)}): merge one budget at a time")
    rows = [row for r in runs for row in r["rows"] if row["method"] != "base"]
    bases: dict[str, dict[str, Any]] = {}
    for r in runs:
        for net, b in r.get("bases", {}).items():
            if net in bases and abs(bases[net]["accuracy"] - b["accuracy"]) > 1e-9:
                raise SystemExit(f"--merge: {net}'s base differs between the runs ({bases[net]['accuracy']} vs "
                                 f"{b['accuracy']}): merge runs on the same cached bases only")
            bases.setdefault(net, b)
    lat = all("latency_ms" in row for row in rows)
    for net, b in bases.items():
        base_rows = [row for r in runs for row in r["rows"] if row["method"] == "base" and row["net"] == net]
        rows.append(base_rows[0] if base_rows and lat else {
            "net": net, "method": "base", "target": 1.0, "macs": b["macs"], "macs_reduction": 1.0,
            "params": b["params"], "accuracy": b["accuracy"], "drop": 0.0})
    noise_by_net = {r["noise"]["net"]: r["noise"] for r in runs if r.get("noise")}
    noise = max(noise_by_net.values(), key=lambda n: n["stdev"], default={})
    first = runs[0]
    result = {k: first.get(k) for k in ("dataset", "train_images", "budget_epochs", "base_epochs", "device",
                                         "device_name", "torch")}
    result.update(latency=lat, finished=all(r.get("finished", True) for r in runs), bases=bases, rows=rows,
                  noise=noise, noise_by_net=noise_by_net, merged_from=[str(f) for f in files],
                  commands=[r.get("command") for r in runs])
    print(f"{'net':14s} {'target':>6s} {'method':16s} {'MACs x':>7s} {'cut %':>7s} {'acc %':>7s} {'drop':>6s}")
    for row in sorted(rows, key=lambda r: (r["net"], r["target"], -r["accuracy"])):
        if row["method"] != "base":
            print(f"{row['net']:14s} {row['target']:5g}x {row['method']:16s} {row['macs_reduction']:6.2f}x "
                  f"{row.get('accuracy_after_cut', float('nan')):7.2f} {row['accuracy']:7.2f} {row['drop']:+6.2f}")
    write_json(out, result)
    summary(result)
    plot(result, out.with_suffix(".png"))


def summary(result: dict[str, Any]) -> None:
    """Per net and target: the best shrinkflow method against the best Torch-Pruning recipe."""
    noise = result["noise"].get("stdev")
    by_net = {net: n["stdev"] for net, n in result.get("noise_by_net", {}).items()}
    print("\nbest shrinkflow vs best Torch-Pruning recipe (accuracy %, drop from base in pt):")
    by: dict[tuple[str, float], list[dict]] = {}
    for r in result["rows"]:
        if r["method"] != "base":
            by.setdefault((r["net"], r["target"]), []).append(r)
    for (net, target), rs in by.items():
        sf = max((r for r in rs if r["method"].startswith("sf_")), key=lambda r: r["accuracy"], default=None)
        tp = max((r for r in rs if r["method"].startswith("tp_")), key=lambda r: r["accuracy"], default=None)
        if sf and tp:
            lead = sf["accuracy"] - tp["accuracy"]
            verdict = ""
            sd = by_net.get(net, noise)  # the net's own seed noise where it was measured
            if sd is not None:  # a lead counts when it passes twice the seed-to-seed stdev
                verdict = " (ahead beyond noise)" if lead > 2 * sd else (
                    " (behind beyond noise)" if lead < -2 * sd else " (within noise)")
            print(f"  {net} {target:g}x: {sf['method']} {sf['accuracy']:.2f} (drop {sf['drop']:+.2f}) vs "
                  f"{tp['method']} {tp['accuracy']:.2f} (drop {tp['drop']:+.2f}): lead {lead:+.2f} pt{verdict}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({r["net"] for r in result["rows"]})
    lat = all("latency_ms" in r for r in result["rows"])  # --no-latency: the MACs panel alone
    cols = 2 if lat else 1
    fig, axes = plt.subplots(len(nets), cols, figsize=(5.5 * cols, 4.2 * len(nets)), squeeze=False)
    for i, net in enumerate(nets):
        rows = [r for r in result["rows"] if r["net"] == net]
        for method in sorted({r["method"] for r in rows} - {"base"}):
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["macs"])
            style = "-o" if method.startswith("sf_") else "--x"
            axes[i][0].plot([r["macs"] / 1e6 for r in rs], [r["accuracy"] for r in rs], style, label=method)
            if lat:
                axes[i][1].plot([r["latency_ms"]["best"] for r in rs], [r["accuracy"] for r in rs], style,
                                label=method)
        base = next(r for r in rows if r["method"] == "base")
        points = [(axes[i][0], base["macs"] / 1e6)] + ([(axes[i][1], base["latency_ms"]["best"])] if lat else [])
        for ax, x in points:
            ax.plot([x], [base["accuracy"]], "k*", markersize=12, label="base")
            ax.set_ylabel("test accuracy %")
            ax.grid(alpha=0.3)
        axes[i][0].set_xlabel("MACs (M)")
        axes[i][0].set_title(f"{net}: accuracy against MACs")
        if lat:
            axes[i][1].set_xlabel("latency ms (batch 1, 1 thread, best engine)")
            axes[i][1].set_title(f"{net}: accuracy against measured latency")
        axes[i][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
