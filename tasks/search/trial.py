"""One trial: apply a point's plan to the base, fine-tune briefly with distillation, score it on the
validation split (never test), measure its cost, and record it as a nested MLflow run."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from compression_ops import Distill, OpData, TrainSpec, evaluate, fit
from compression_ops.base import report_scalars, to_plain
from compression_ops.channel_prune import latency_reduction
from compression_ops.metrics import count_macs, count_params
from compression_ops.packing import pack_state_dict
from compression_ops.quantize import quantized_state_dict
from tasks.config import PipelineConfig
from tasks.data.loaders import Splits, TensorBatches
from tasks.search.space import SearchSpace
from tasks.search.study import interruption_point
from tasks.workspace import write_json


def deployed_bytes(model: nn.Module) -> int:
    """Packed size of what a device downloads (integer codes where the plan quantizes)."""
    return len(pack_state_dict(quantized_state_dict(model)))


class LatencyCache:
    """Latency ratios (base / candidate, batch 1) per architecture and device, kept on disk.

    Plans that prune to the same widths cost the same: a search meets many of them, and a nightly run
    meets last night's. Keyed by the device and a hash of every layer's shape. Two kinds of entry:

    * measured by the benchmark stage on the device, per engine (`record`; hardware in the loop):
      the search uses the fastest engine's ratio, the engine the deployment would pick;
    * measured here when the search meets a new architecture: PyTorch eager for the host, or the
      TVM build run over RPC on a remote device (`measure`).
    """

    def __init__(self, path: Path, device: str = "host", registry: Path | None = None):
        self.path, self.device, self.registry = path, device, registry
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def signature(model: nn.Module) -> str:
        shapes = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
        return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]

    def _save(self) -> None:
        try:  # a cache: losing a write to a concurrent worker only costs a re-measurement
            write_json(self.path, self.data)
        except OSError:
            pass

    def record(self, base: nn.Module, model: nn.Module, engine: str, base_ms: float, ms: float,
               *, emulated: bool = False) -> None:
        """Store a ratio measured on the device by `engine` (the benchmark stage calls this)."""
        key = f"{self.device}:{engine}:{self.signature(base)}:{self.signature(model)}"
        self.data[key] = {"latency_reduction": base_ms / ms, "latency_ms": ms, "base_latency_ms": base_ms,
                          "engine": engine, "emulated": emulated, "source": "benchmark"}
        self._save()

    def measure(self, base: nn.Module, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        """The candidate's latency ratio on this cache's device (cached, benchmarked or measured now)."""
        sigs = f"{self.signature(base)}:{self.signature(model)}"
        benched = [v for k, v in self.data.items()
                   if k.startswith(f"{self.device}:") and k.endswith(sigs) and v.get("source") == "benchmark"]
        if benched:
            best = min(benched, key=lambda v: v["latency_ms"])
            return {**_numbers(best), "latency_cached": 1.0, "latency_on_device": 1.0}
        key = f"{self.device}:{sigs}"
        cached = key in self.data
        if not cached:
            self.data[key] = self._measure_now(base, model, x)
            self._save()
        return {**_numbers(self.data[key]), "latency_cached": float(cached),
                "latency_on_device": float(self.device != "host")}

    def _measure_now(self, base: nn.Module, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        from tasks.devices import get_device

        device = get_device(self.device, self.registry)
        if device.rpc is None:
            ratio, ms_base, ms = latency_reduction(base, model, x, repeat=60, warmup=5)
            return {"latency_reduction": ratio, "latency_ms": ms, "base_latency_ms": ms_base, "engine": "pytorch"}
        ms_base, ms, emulated = tvm_latency_on_device(device, base, model, x)
        return {"latency_reduction": ms_base / ms, "latency_ms": ms, "base_latency_ms": ms_base,
                "engine": "tvm", "emulated": bool(emulated)}


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    return {k: float(entry[k]) for k in ("latency_reduction", "latency_ms", "base_latency_ms")}


def tvm_latency_on_device(device: Any, base: nn.Module, model: nn.Module, x: torch.Tensor) -> tuple[float, float, Any]:
    """Batch-1 latency in ms of base and model compiled with TVM for `device` and timed on it over RPC."""
    import tempfile

    from tasks.engines.tvm_build import build_tvm
    from tasks.engines.tvm_rpc import RemoteTVMRunner, connect

    connect(device.rpc)  # a device that is down fails here, before two builds
    with tempfile.TemporaryDirectory(prefix="shrinkflow-hil-") as tmp:
        ms, emulated = [], None
        for i, m in enumerate((base, model)):
            out = Path(tmp) / str(i)
            build_tvm(m, x, device.tvm_target(), out, batch_sizes=(1,), cross_compiler=device.cross_compiler)
            with RemoteTVMRunner.for_device(out, device) as r:
                st = r.time(x[:1].numpy(), number=10, repeat=5, warmup=2)
            ms.append(st["median_ms"])
            emulated = st.get("emulated")
    return ms[0], ms[1], emulated


@dataclass
class TrialRunner:
    """What every trial needs, loaded once per worker."""

    cfg: PipelineConfig
    base: nn.Module
    splits: Splits
    space: SearchSpace
    latency_cache: LatencyCache
    tracker: Any = None  # tasks.tracking.TrialTracker or None
    worker: int = 0
    base_val: float = 0.0
    base_macs: int = 0
    base_bytes: int = 0
    _train_xy: tuple | None = field(default=None, repr=False)
    _val: list | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        sc = self.cfg.search
        x, y = self.splits.tensors["train"]
        if sc.train_subset and sc.train_subset < len(y):
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(sc.seed))[: sc.train_subset]
            x, y = x[idx], y[idx]
        self._train_xy = (x, y)
        vx, vy = self.splits.tensors["val"]
        n = min(sc.val_images, len(vy))
        self._val = [(vx[i : min(i + 500, n)], vy[i : min(i + 500, n)]) for i in range(0, n, 500)]
        self.example = self.splits.example(1)
        self.base.eval()
        self.base_val = evaluate(self.base, self._val)["accuracy"]
        self.base_macs = count_macs(self.base, self.example)
        self.base_bytes = deployed_bytes(self.base)

    @property
    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.space.multi_objective else ["maximize"]

    def cost_metric(self) -> str:
        """The second objective of a multi-objective search."""
        c, g = self.cfg.search.cost, self.cfg.goal
        if c != "auto":
            return c
        if g.metric == "latency" and g.speedup or g.latency_ms:
            return "latency"
        return "size" if g.size_mb and not g.speedup else "macs"

    def needs_latency(self) -> bool:
        g = self.cfg.goal
        return bool(g.latency_ms or (g.speedup and g.metric == "latency") or
                    (self.space.multi_objective and self.cost_metric() == "latency"))

    def constraints(self, m: dict[str, float]) -> tuple[list[float], list[str]]:
        """Violation of each cost goal, relative to it (<= 0 met). Accuracy is the objective, not a
        constraint: a few epochs understate it; the full fine-tune checks the accuracy goal."""
        g = self.cfg.goal
        vals, names = [], []
        if g.speedup:
            got = m["latency_reduction"] if g.metric == "latency" else m["macs_reduction"]
            vals.append((g.speedup - got) / g.speedup)
            names.append(f"speedup>={g.speedup} ({g.metric})")
        if g.size_mb:
            vals.append((m["size_mb"] - g.size_mb) / g.size_mb)
            names.append(f"size_mb<={g.size_mb}")
        if g.latency_ms:
            vals.append((m["latency_ms"] - g.latency_ms) / g.latency_ms)
            names.append(f"latency_ms<={g.latency_ms}")
        return vals, names

    def objective_values(self, m: dict[str, float]) -> list[float]:
        if not self.space.multi_objective:
            return [m["val_accuracy"]]
        cost = {"macs": m["macs"] / 1e6, "latency": m.get("latency_ms", 0.0), "size": m["size_mb"]}[self.cost_metric()]
        return [m["val_accuracy"], cost]

    # --- the trial ---------------------------------------------------------------------------------

    def run(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Evaluate `trial` and tell the study; the MLflow child run mirrors the outcome."""
        t0 = time.perf_counter()
        point = self.space.suggest(trial)
        trial.set_user_attr("worker", self.worker)
        run = self.tracker.trial_run(trial.number, self.worker) if self.tracker else None
        if run is not None:
            trial.set_user_attr("mlflow_run_id", run.run_id)
            run.params({"trial": point})
        state, values, metrics = TrialStateOutcome.FAIL, None, {}
        try:
            try:
                metrics, plan_json = self._evaluate(trial, point, run)
                values = self.objective_values(metrics)
                cons, names = self.constraints(metrics)
                trial.set_user_attr("constraints", cons)
                trial.set_user_attr("constraint_names", names)
                trial.set_user_attr("metrics", metrics)
                trial.set_user_attr("plan", plan_json)
                for name, c in zip(names, cons, strict=True):
                    trial.set_constraint(name, c)  # what TPE / NSGA-II read to prefer feasible points
                state = TrialStateOutcome.COMPLETE
            except optuna.TrialPruned:
                state = TrialStateOutcome.PRUNED
            except optuna.exceptions.UpdateFinishedTrialError:
                # another worker declared this trial stale (its retry runs the point again): drop ours
                state = TrialStateOutcome.STALE
            except Exception as e:  # noqa: BLE001 - a point the ops refuse, or a crash: a failed trial, with why
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
                trial.set_user_attr("constraints", [1.0])
            seconds = time.perf_counter() - t0
            if state != TrialStateOutcome.STALE:
                trial.set_user_attr("seconds", round(seconds, 2))
                if state == TrialStateOutcome.COMPLETE:
                    study.tell(trial, values, skip_if_finished=True)
                else:
                    tstate = optuna.trial.TrialState.PRUNED if state == TrialStateOutcome.PRUNED else optuna.trial.TrialState.FAIL
                    study.tell(trial, state=tstate, skip_if_finished=True)
        finally:
            if run is not None:  # the MLflow run ends with the trial, whatever happened
                run.metrics({**{k: v for k, v in metrics.items() if isinstance(v, int | float)},
                             "trial_seconds": time.perf_counter() - t0})
                error = trial.user_attrs.get("error") if state == TrialStateOutcome.FAIL else None
                run.tags({"trial_state": state, **({"error": error[:500]} if error else {})})
                run.finish({"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))

    def _evaluate(self, trial: optuna.Trial, point: dict[str, Any], run) -> tuple[dict[str, float], list[dict]]:
        from tasks.plan import apply_ops, ops_in_phase

        plan, ft = self.space.build(point)
        plan_json = [p.to_dict() for p in plan]
        if run is not None:
            run.log_dict({"plan": plan_json, "finetune": ft, "point": point}, "plan.json")
        # A fresh loader per trial: every trial sees the same batches in the same order (a shared loader
        # reshuffles on each pass, so a point's score depended on its position in the study)
        x, y = self._train_xy
        bs = self.cfg.finetune.batch_size
        train = TensorBatches(x, y, bs, shuffle=True, augment=self.cfg.train.augment, seed=self.cfg.search.seed + 1,
                              drop_last=len(y) >= 2 * bs)
        data = OpData(example=self.example, batches=train, max_batches=8)
        pre = ops_in_phase(plan, "structure") + ops_in_phase(plan, "train")
        # a copy: a plan with no structural or training op would otherwise fine-tune the base itself
        model, hooks, reports = apply_ops(self.cfg, copy.deepcopy(self.base), pre, data, quiet=True)
        report = {f"{r['op']}.{k}": v for r in reports for k, v in report_scalars(r).items()}
        distill = next((p for p in plan if isinstance(p, Distill)), None)
        sc = self.cfg.search
        prunable = not self.space.multi_objective
        # budget accounting: training images this trial went through, its ops' own training included
        # (a pruned trial counts the epochs it ran); the search stage sums them over the study
        seen = sum(int(r.get("train_epochs", 0)) for r in reports) * len(y)
        trial.set_user_attr("train_images", seen)

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            trial.set_user_attr("train_images", seen + epoch * len(y))
            interruption_point()  # a Ctrl-C during this epoch stops the trial here
            if run is not None:
                run.metrics({"val_accuracy_epoch": row["val_accuracy"], "train_loss": row["train_loss"]}, step=epoch)
            if prunable and epoch < sc.trial_epochs:  # the last epoch's score is the result itself
                trial.report(row["val_accuracy"], epoch)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at_epoch", epoch)
                    raise optuna.TrialPruned(f"val accuracy {row['val_accuracy']:.2f}% at epoch {epoch}")

        spec = TrainSpec(epochs=sc.trial_epochs, lr=ft["lr"], weight_decay=self.cfg.finetune.weight_decay,
                         schedule="cosine", seed=self.cfg.train.seed,
                         optimizer=self.cfg.finetune.optimizer or self.cfg.train.optimizer)
        fit(model, train, spec, teacher=self.base if distill else None, distill=distill, val=self._val,
            on_epoch=on_epoch, hooks=hooks)
        for h in hooks:
            h.finish()
        model = to_plain(model).eval()
        deployed, _, _ = apply_ops(self.cfg, model, ops_in_phase(plan, "post"), data, quiet=True)
        acc = evaluate(deployed, self._val)["accuracy"]
        macs = count_macs(model, self.example)
        size = deployed_bytes(deployed)
        m: dict[str, float] = {
            **report,
            "val_accuracy": acc,
            "val_accuracy_drop": self.base_val - acc,
            "base_val_accuracy": self.base_val,
            "macs": float(macs),
            "macs_reduction": self.base_macs / max(macs, 1),
            "params": float(count_params(model)),
            "size_mb": size / 1e6,
            "size_reduction": self.base_bytes / max(size, 1),
        }
        if self.needs_latency():
            m.update(self.latency_cache.measure(self.base, model, self.example))
        return m, plan_json


class TrialStateOutcome:
    COMPLETE, PRUNED, FAIL, STALE = "COMPLETE", "PRUNED", "FAIL", "STALE"
