"""Check every artifact the compile stage built against PyTorch, then time it the way its engine says.

* interleaved (engines in this process): each runs the whole test split, then all are timed round-robin
  at each batch size with the same thread count, so drift hits all alike;
* device (TVM over RPC): the first `remote_check_images` test images, then TVM's time_evaluator on the
  device (an emulated device's figures are flagged `emulated`: qemu's speed, not an ARM CPU's);
* estimate (FPGA): the C simulation on the first `remote_check_images` images against the quantized
  PyTorch model it implements; its latency is the engine's analytic estimate, never a timing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import BenchmarkConfig
from tasks.context import StageContext
from tasks.devices import Device, get_device, registry_of
from tasks.engines import Engine, get_engine
from tasks.engines.pytorch_eager import TorchRunner
from tasks.engines.timing import time_interleaved
from tasks.errors import ArtifactError
from tasks.latency.rows import Check, Latency, Skipped
from tasks.progress import say
from tasks.workspace import read_json

COMPILE_FORMAT = 3  # tasks/stages/compile.py's FORMAT: rows are artifacts or skips


@dataclass(frozen=True)
class Artifact:
    """One artifact of compile.json: an engine's build of one model for one device."""

    engine: Engine
    model: str
    device: Device = field(hash=False)
    path: Path
    meta: dict[str, Any] = field(hash=False, compare=False)

    @property
    def target(self) -> str:
        return self.device.name

    @property
    def bytes(self) -> int | None:
        """What a device downloads: the file, or a folder's library (None for a whole project)."""
        if self.path.is_file():
            return self.path.stat().st_size
        lib = self.path / self.meta.get("library", "")
        return lib.stat().st_size if "library" in self.meta and lib.is_file() else None


def artifacts(ctx: StageContext) -> tuple[list[Artifact], list[Skipped]]:
    """The artifacts the compile stage listed in compile.json, and the builds it skipped."""
    doc = read_json(ctx.paths.require("compile", "compile.json"))
    if not isinstance(doc, dict) or doc.get("format") != COMPILE_FORMAT:
        raise ArtifactError(
            f"{ctx.paths.stage_dir('compile') / 'compile.json'} is from an older shrinkflow (format "
            f"{doc.get('format', 1) if isinstance(doc, dict) else '?'}, expected {COMPILE_FORMAT}); re-run the "
            f"compile stage: shrinkflow run {ctx.paths.pipeline} --force compile"
        )
    compiled, registry = ctx.paths.stage_dir("compile"), registry_of(ctx.cfg)
    built = [Artifact(get_engine(a["engine"]), a["model"], get_device(a["target"], registry), compiled / a["path"],
                      a["meta"]) for a in doc["artifacts"] if "skipped" not in a]
    skipped = [Skipped(a["model"], a["engine"], a["target"], str(a["skipped"])) for a in doc["artifacts"] if "skipped" in a]
    return built, skipped


@dataclass
class TestSplit:
    """The test split and PyTorch's logits on it: the float models', and the quantized model's on demand."""

    x: np.ndarray
    y: np.ndarray
    ref: dict[str, np.ndarray]  # float PyTorch logits by model ("base", "compressed")
    quantized: Callable[[], np.ndarray]  # the deployed (quantized) compressed model's logits
    models: dict[str, Any]  # the float models themselves, by the same names

    @cached_property
    def deployed_ref(self) -> np.ndarray:
        return self.quantized()

    def reference(self, a: Artifact) -> np.ndarray:
        return self.deployed_ref if a.engine.reference == "deployed" else self.ref[a.model]


def test_split(ctx: StageContext, batch: int) -> TestSplit:
    sp = ctx.splits()
    x = np.ascontiguousarray(sp.tensors["test"][0].numpy())
    models = {"base": ctx.model("train_base")[0], "compressed": ctx.model("finetune")[0]}
    ref = {w: logits(TorchRunner(m), x, batch) for w, m in models.items()}
    return TestSplit(x, sp.tensors["test"][1].numpy(), ref,
                     lambda: logits(TorchRunner(ctx.deployed_model(models["compressed"])), x, batch), models)


def logits(runner: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """runner's outputs for all of x, in batches of `batch`."""
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)])


def check(a: Artifact, lg: np.ndarray, data: TestSplit, seconds: float | None = None) -> Check:
    """lg (the artifact's logits on the first len(lg) test images) against the labels and its reference.

    int8 is compared with float PyTorch: the agreement shows what quantization changed.
    """
    n, ref = len(lg), data.reference(a)[: len(lg)]
    return Check(a.model, a.engine.name, a.target, n, float(100.0 * (lg.argmax(1) == data.y[:n]).mean()),
                 float(np.abs(lg - ref).max()), float((lg.argmax(1) == ref.argmax(1)).mean()),
                 seconds / n if seconds is not None else None)


@dataclass
class Measured:
    checks: list[Check] = field(default_factory=list)
    rows: list[Latency] = field(default_factory=list)
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)  # by target
    skipped: list[Skipped] = field(default_factory=list)  # builds compile skipped: reported, not measured


def interleaved(arts: list[Artifact], data: TestSplit, bc: BenchmarkConfig) -> Measured:
    """Check each in-process engine on the whole test split, then time them all round-robin."""
    m = Measured()
    if not arts:
        return m
    runners = {a: a.engine.load(a.path, a.device, threads=bc.threads) for a in arts}
    m.checks = [check(a, logits(r, data.x, max(bc.batch_sizes)), data) for a, r in runners.items()]
    for batch in bc.batch_sizes:
        x = np.ascontiguousarray(data.x[:batch])
        stats = time_interleaved({a: (lambda r=r, x=x: r.run(x)) for a, r in runners.items()}, bc.warmup, bc.repeat)
        m.rows += [Latency(a.model, a.engine.name, a.target, batch, st["median_ms"], st["p90_ms"], st["mean_ms"],
                           st["min_ms"], n=st["n"], emulated=False, artifact_bytes=a.bytes) for a, st in stats.items()]
    return m


def on_device(a: Artifact, data: TestSplit, bc: BenchmarkConfig) -> Measured:
    """Check on the device's first remote_check_images test images, then time there at each batch size."""
    n = min(len(data.x), bc.remote_check_images)
    say(f"{a.model} on device {a.target!r} ({a.engine.name}) ...")
    m = Measured()
    with contextlib.closing(a.engine.load(a.path, a.device, threads=bc.threads)) as r:
        m.checks.append(check(a, logits(r, data.x[:n], max(bc.batch_sizes)), data))
        for b in bc.batch_sizes:
            # repeat samples of `number` calls each, timed on the device (emulated: ~1 s a call)
            st = r.time(np.ascontiguousarray(data.x[:b]), number=bc.remote_number, repeat=bc.remote_repeat,
                        warmup=min(bc.warmup, 2))
            m.rows.append(Latency(a.model, a.engine.name, a.target, b, st["median_ms"], st["p90_ms"], st["mean_ms"],
                                  st["min_ms"], emulated=st.get("emulated"), artifact_bytes=a.bytes))
    return m


def estimated(a: Artifact, data: TestSplit, bc: BenchmarkConfig) -> Measured:
    """Check the simulation against the model it implements; the latency is the engine's estimate."""
    n = min(len(data.x), bc.remote_check_images)  # a C simulation is slow (ms per image)
    say(f"{a.engine.name} {a.target}: bit-accurate simulation on {n} test images ...")
    r = a.engine.load(a.path, a.device, threads=bc.threads)
    t0 = time.perf_counter()
    lg = logits(r, data.x[:n], max(bc.batch_sizes))
    c = check(a, lg, data, seconds=time.perf_counter() - t0)
    est = a.engine.adapter.estimate(a.path)
    say(f"{a.engine.name} {a.target}: top-1 agreement with the quantized PyTorch model "
        f"{100 * c.top1_agreement_vs_pytorch:.2f}% on {c.images} test images; estimated "
        f"{a.engine.adapter.estimate_line(est)} (analytic, not synthesis)")
    return Measured(checks=[c], estimates={a.target: est})


def measure(arts: list[Artifact], data: TestSplit, bc: BenchmarkConfig, skipped: list[Skipped] | None = None) -> Measured:
    """Every artifact checked, and timed or estimated as its engine declares; the skipped builds listed."""
    m = interleaved([a for a in arts if a.engine.timing == "interleaved"], data, bc)
    m.skipped = list(skipped or [])
    for a in arts:
        if a.engine.timing != "interleaved":
            part = (on_device if a.engine.timing == "device" else estimated)(a, data, bc)
            m.checks += part.checks
            m.rows += part.rows
            m.estimates.update(part.estimates)
    return m
