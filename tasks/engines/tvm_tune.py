"""Tune the CPU schedule per kernel on this machine, and keep the result in a tuning database.

MetaSchedule (TVM's tuner) crashes in apache-tvm 0.27.0.post1, so shrinkflow tunes its own schedule
(`tvm_schedule`): each fused kernel of the model is compiled alone with every candidate `Knobs`, at
every batch size asked (static shapes), timed with TVM's time_evaluator on this CPU, and the knobs
with the lowest summed log-time win. Results go to a JSON database keyed by the kernel's code and
the target, so a nightly run, or another model sharing a layer shape, re-uses them at no cost:

    {"version": 1, "entries": {"<sha>": {"kernel": ..., "target": ..., "knobs": {...},
                                         "ms": {"acc12-outer": {"1": 0.05, "32": 0.9}, ...}}}}

The database lives at `.shrinkflow/tuning/<device>.json` (DVC-tracked by the compile stage) and is
written atomically. A budget in seconds bounds the tuning; kernels left over keep default knobs.
Only an x86/ARM host target can be tuned here: cross-compiled targets use the defaults (or what a
database tuned on the device holds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tasks.engines.tvm_schedule import Knobs, _schedule_func, default_knobs, prepare_passes, vector_lanes

log = logging.getLogger(__name__)

DB_VERSION = 1


def candidates(lanes: int) -> list[Knobs]:
    """The knobs tried per kernel: accumulator budgets up to the register file, both row splits."""
    registers = 32 if lanes >= 16 else 16
    accs = sorted({4, registers // 2, registers * 3 // 4, registers - 2})
    first = default_knobs(lanes)
    rest = [Knobs(a, r) for a in accs for r in ("outer", "unroll") if Knobs(a, r) != first]
    return [first, *rest]


class TuningDB:
    """Knobs by kernel key, in one JSON file; `save` writes it atomically."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == DB_VERSION:
                    self.entries = dict(data.get("entries", {}))
            except (json.JSONDecodeError, AttributeError) as e:
                log.warning("tuning database %s is unreadable (%s): starting a new one", self.path, e)

    def get(self, key: str) -> Knobs | None:
        e = self.entries.get(key)
        return Knobs(**e["knobs"]) if e else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry

    def save(self) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": DB_VERSION, "entries": self.entries}, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)


def _kernels(model: Any, example: Any, target: Any, batch: int) -> dict[str, Any]:
    """The model's PrimFuncs (before scheduling) at a static batch size, by kernel name."""
    import torch
    import tvm
    from tvm import tirx
    from tvm.relax.frontend.torch import from_exported_program

    from tasks.engines.base import exportable, quiet_torch_export

    x = example[:1].repeat(batch, *([1] * (example.dim() - 1)))
    with quiet_torch_export():
        ep = torch.export.export(exportable(model.eval()), (x,))
        mod = from_exported_program(ep, keep_params_as_input=False)
    with target:
        mod = tvm.transform.Sequential(prepare_passes(target))(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _time_kernel(func: Any, target: Any, number: int, repeat: int) -> float:
    """Median ms of one scheduled static PrimFunc on random inputs."""
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in a.shape]).astype(a.dtype), dev)
            for a in ArgInfo.from_prim_func(func)]
    return lib.mod.time_evaluator("main", dev, number=number, repeat=repeat, min_repeat_ms=20)(*args).median * 1e3


def _distinct_schedules(funcs: dict[int, Any], lanes: int) -> list[tuple[Knobs, dict[int, Any]]]:
    """The candidates that give different code for a kernel (at every batch size), the default first;
    empty when the rule does not schedule it."""
    from tvm_ffi import structural_hash

    seen: set[tuple[int, ...]] = set()
    out = []
    for knobs in candidates(lanes):
        try:
            scheduled = {b: _schedule_func(f, lanes, knobs) for b, f in funcs.items()}
        except Exception as e:  # a candidate that fails to schedule is skipped
            log.debug("knobs %s: %s", knobs.key(), e)
            continue
        if any(s is None for s in scheduled.values()):
            return []  # not a kernel the rule schedules: no knobs to choose
        code = tuple(structural_hash(scheduled[b], map_free_vars=True) for b in sorted(scheduled))
        if code not in seen:
            seen.add(code)
            out.append((knobs, scheduled))
    return out


def kernel_key(funcs: dict[int, Any], target: Any) -> str:
    """A kernel's database key: its code at every tuned batch size, and the target."""
    h = hashlib.sha256(str(target).encode())
    for b in sorted(funcs):
        h.update(str(b).encode())
        h.update(funcs[b].script().encode())
    return h.hexdigest()[:20]


def tune(
    model: Any,
    example: Any,
    target: Any,
    db_path: Path | None,
    *,
    budget_s: float = 300.0,
    batch_sizes: tuple[int, ...] = (1, 32),
    number: int = 10,
    repeat: int = 3,
) -> tuple[dict[str, Knobs], dict[str, Any]]:
    """Knobs by kernel name for this model on this CPU, and a report; fills the database.

    Kernels found in the database are not timed again. Timing stops when budget_s is spent (the
    export and lowering at each batch size come first and are not counted); the rest keep default
    knobs (and are tuned by the next run).
    """
    import tvm

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    lanes = vector_lanes(target)
    db = TuningDB(db_path)
    if budget_s <= 0 and not db.entries:
        # Nothing to time and nothing to look up: extracting the kernels (an export, import and
        # lowering per batch size) would only cost time.
        return {}, {"kernels": None, "from_db": 0, "tuned": 0, "left_default": 0, "candidates": [],
                    "gain": {}, "candidates_timed": 0, "seconds": 0.0, "extract_seconds": 0.0,
                    "database": str(db_path) if db_path else None,
                    "skipped": "no tuning budget and an empty database"}
    t0 = time.perf_counter()
    by_batch = {b: _kernels(model, example, target, b) for b in batch_sizes}
    names = sorted(set.intersection(*(set(k) for k in by_batch.values())))
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # the budget is for timing candidates; extraction is a fixed cost
    chosen: dict[str, Knobs] = {}
    report: dict[str, Any] = {"kernels": len(names), "from_db": 0, "tuned": 0, "left_default": 0, "untunable": 0,
                              "candidates": [k.key() for k in candidates(lanes)], "gain": {}}
    timed = 0
    for name in names:
        funcs = {b: by_batch[b][name] for b in batch_sizes}
        key = kernel_key(funcs, target)
        known = db.get(key)
        if known is not None:
            chosen[name] = known
            report["from_db"] += 1
            continue
        if time.perf_counter() - t0 > budget_s:
            report["left_default"] += 1
            continue
        ms: dict[str, dict[str, float]] = {}
        distinct = _distinct_schedules(funcs, lanes)
        if len(distinct) == 1:
            # Every candidate gives the same code (an elementwise kernel, or a block the knobs do not
            # change): the default is the answer, and compiling it to time it would be wasted.
            report["untunable"] += 1
            continue
        for knobs, scheduled in distinct:
            try:
                ms[knobs.key()] = {str(b): _time_kernel(s, target, number, repeat) for b, s in scheduled.items()}
                timed += 1
            except Exception as e:  # a candidate that fails to build is skipped
                log.debug("kernel %s, knobs %s: %s", name, knobs.key(), e)
            if time.perf_counter() - t0 > budget_s:
                break
        if not ms:
            continue
        # Summed log-time: each batch size counts alike, whatever its absolute scale.
        best = min(ms, key=lambda k: sum(math.log(max(t, 1e-6)) for t in ms[k].values()))
        knobs = next(k for k in candidates(lanes) if k.key() == best)
        default = default_knobs(lanes).key()
        db.put(key, {"kernel": name, "target": str(target), "knobs": asdict(knobs), "ms": ms,
                     "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        chosen[name] = knobs
        report["tuned"] += 1
        if default in ms:
            report["gain"][name] = {b: ms[default][b] / ms[best][b] for b in ms[best]}
    db.save()
    report["candidates_timed"] = timed
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["extract_seconds"] = round(extract_s, 1)
    report["database"] = str(db_path) if db_path else None
    return chosen, report
