"""Inference engines by name: what each builds, for which devices, how it loads and how it is timed.

The registry is the truth the compile and benchmark stages iterate: a pipeline's `targets` pick the
devices, `benchmark.engines` (default: every registered engine) picks the engines, and each engine
serves the devices its `runs_on` allows. Adding an engine is one module with the adapter functions
below plus one `register_engine(...)` line here.

An engine's module (its adapter) defines:

    build(job: BuildJob) -> dict          writes job.out (a file or a folder) and returns its metadata
    load(artifact, device, threads) -> Runner   `.run(x: np.ndarray) -> logits`, `.input_shape`;
                                          refuses a corrupt or mismatched artifact with ArtifactError
    read_meta(artifact) -> dict           the metadata build returned, read back from disk
    describe(meta) -> str                 one line for the log: what was built and how it checked

Importing this package is cheap: torch, TVM and ONNX Runtime load only when an engine is used.

    engine = get_engine("tvm")
    meta = engine.build(job)                       # tasks.engines.tvm_build.build
    runner = engine.load(job.out, device, threads=2)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from tasks.errors import ConfigError

if TYPE_CHECKING:
    from tasks.devices import Device
    from tasks.engines.base import BuildJob, Runner

# Which devices an engine serves:
#   host   this process on this machine; its rows are always for the device "host" (the reference engines)
#   local  each pipeline target compiled for and run on this machine (an LLVM target without RPC)
#   rpc    each pipeline target reached over TVM RPC (an LLVM target with `rpc:`)
#   fpga   each HLS target ({kind: hls}): a project and its C simulation
RunsOn = Literal["host", "local", "rpc", "fpga"]
# How it is timed: interleaved with the other in-process engines; on the device (TVM time_evaluator);
# or not at all (an FPGA's latency is an analytic estimate; its C simulation only checks outputs).
Timing = Literal["interleaved", "device", "estimate"]


@dataclass(frozen=True)
class Engine:
    """A registered engine: its adapter module (resolved on first use) and what it declares."""

    name: str
    module: str
    artifact: str  # where build writes, under compile/: {model} and {target} are filled in
    runs_on: RunsOn
    dtype: Literal["float32", "int8", "fixed-point"]
    timing: Timing
    models: tuple[str, ...] = ("base", "compressed")
    int8_plan: bool = False  # built only when the plan quantizes to int8 after training
    base_engine: str | None = None  # the engine whose base row a compressed row is compared with (None: itself)
    reference: Literal["float", "deployed"] = "float"  # compared with float PyTorch, or the quantized model
    description: str = ""

    @property
    def adapter(self) -> ModuleType:
        return importlib.import_module(self.module)

    def build(self, job: BuildJob) -> dict[str, Any]:
        """Write the artifact to job.out; its metadata."""
        return self.adapter.build(job)

    def load(self, artifact: Path, device: Device, *, threads: int) -> Runner:
        """A runner for the artifact, which it checks first (ArtifactError when corrupt or mismatched)."""
        return self.adapter.load(Path(artifact), device, threads=threads)

    def read_meta(self, artifact: Path) -> dict[str, Any]:
        return self.adapter.read_meta(Path(artifact))

    def describe(self, meta: dict[str, Any]) -> str:
        return self.adapter.describe(meta)

    def serves(self, device: Device) -> bool:
        """True when this engine builds for and runs on device."""
        if self.runs_on == "fpga":
            return device.is_fpga
        if device.is_fpga:
            return False
        if self.runs_on == "host":
            return device.name == "host"
        return (device.rpc is None) == (self.runs_on == "local")

    def artifact_path(self, model: str, target: str) -> str:
        """The artifact's path relative to the compile stage's folder."""
        return self.artifact.format(model=model, target=target)


ENGINES: dict[str, Engine] = {}


def register_engine(engine: Engine) -> Engine:
    """Add (or replace) an engine under engine.name."""
    ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    """The engine called name, or ConfigError listing the known ones."""
    if name not in ENGINES:
        raise ConfigError(
            f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}. Fix benchmark.engines in pipelines.yaml."
        )
    return ENGINES[name]


@dataclass(frozen=True)
class Build:
    """One artifact a pipeline needs: an engine building one model for one device."""

    engine: Engine
    model: str  # "base" or "compressed"
    device: Device

    @property
    def target(self) -> str:
        return self.device.name

    @property
    def path(self) -> str:
        return self.engine.artifact_path(self.model, self.target)


def builds(engines: list[str] | None, devices: list[Device], host: Device, *, int8_plan: bool) -> list[Build]:
    """Every (engine, model, device) the pipeline builds and measures, in registry order.

    engines: the names the pipeline asks for (None: all registered). devices: its targets. host: this
    machine, which the host engines run on whether or not it is a target. int8_plan: whether the plan
    quantizes to int8 after training. A target that no chosen engine serves is a ConfigError.
    """
    chosen = [get_engine(n) for n in engines] if engines is not None else list(ENGINES.values())
    for d in devices:
        if not any(e.serves(d) for e in chosen if e.runs_on != "host"):
            can = [e.name for e in ENGINES.values() if e.runs_on != "host" and e.serves(d)]
            raise ConfigError(
                f"target {d.name!r} has no engine among benchmark.engines {[e.name for e in chosen]}; "
                f"add {' or '.join(can) or 'an engine that serves it'} to benchmark.engines, or drop the target"
            )
    out = []
    for e in chosen:
        if e.int8_plan and not int8_plan:
            continue
        for d in [host] if e.runs_on == "host" else [d for d in devices if e.serves(d)]:
            out += [Build(e, m, d) for m in e.models]
    return out


# Registry order is build order: the int8 engine quantizes the fp32 ONNX export built before it.
for _engine in (
    Engine("pytorch", "tasks.engines.pytorch_eager", "{model}/model.pt", "host", "float32", "interleaved",
           description="PyTorch eager, the reference: the trained or fine-tuned checkpoint, run as it is"),
    Engine("onnxruntime", "tasks.engines.onnx_runtime", "{model}/model.onnx", "host", "float32", "interleaved",
           description="ONNX Runtime CPU on an fp32 ONNX export (channels padded to the vector width)"),
    Engine("tvm", "tasks.engines.tvm_build", "{model}/{target}", "local", "float32", "interleaved",
           description="TVM Relax library compiled for a target on this machine, tuned within a budget"),
    Engine("tvm_rpc", "tasks.engines.tvm_rpc", "{model}/{target}", "rpc", "float32", "device",
           description="TVM Relax library cross-compiled for a device and run and timed on it over TVM RPC"),
    Engine("onnxruntime_int8", "tasks.engines.onnx_int8", "{model}/model.int8.onnx", "host", "int8", "interleaved",
           models=("compressed",), int8_plan=True, base_engine="onnxruntime",
           description="ONNX Runtime with int8 kernels: the fp32 export quantized (QDQ) as the plan calibrates"),
    Engine("fpga_hls", "tasks.engines.fpga.engine", "{model}/{target}", "fpga", "fixed-point", "estimate",
           models=("compressed",), reference="deployed",
           description="hls4ml HLS project of the quantized model, checked by its bit-accurate C simulation"),
):
    register_engine(_engine)
