"""Compile a PyTorch model with TVM Relax into one shared library, and load it back safely.

Batch handling: one library with a dynamic batch dimension. The model is exported with
`torch.export` and a symbolic batch `Dim` (the export example is the given example repeated to
batch 2, because torch specializes a size-1 dimension to a constant). TVM 0.27 compiles the
symbolic batch into every kernel: the batch loop is fused into each kernel's parallel loop, and all
other extents stay constant, so the schedule is the same as a static build. The result is checked
against PyTorch at every size in `batch_sizes` (1 and 32 by default) and the differences are stored
in meta.json. One library means one artifact and one hash per model and target, and any batch size
runs. The batch has no upper bound: with one, TVM's memory planner reserves every buffer for the
largest batch; without, buffers are sized per call (from a pool).

The Relax pipeline is `tvm_schedule.cpu_pipeline`: the standard CPU legalize/fold/fuse/lower passes,
NHWC convolutions and a parallel, vectorized, register-blocked loop schedule. Before export, pruned
channel counts are padded with exact zeros to whole vector registers of the target (pad_channels.py),
and with a tuning database the schedule's knobs are tuned per kernel on this CPU (tvm_tune.py).
Measured on this 2-core AVX2 host (bench/engines.py): the pruned ResNet-8 went from 0.3x to faster
than ONNX Runtime at batch 32 with both.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.engines.base import (
    EngineUnsupported,
    check_input,
    diff_vs_reference,
    export_failed,
    exportable,
    first_line,
    quiet_torch_export,
    sha256_file,
)
from tasks.errors import ArtifactError, StageError

if TYPE_CHECKING:
    from tasks.devices import Device
    from tasks.engines.base import BuildJob

log = logging.getLogger(__name__)

LIBRARY = "model.so"
META = "meta.json"
# Debian packages that carry the cross compilers named in infra/devices.yaml.
CROSS_COMPILER_PACKAGES = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "arm-linux-gnueabihf-gcc": "gcc-arm-linux-gnueabihf",
    "riscv64-linux-gnu-gcc": "gcc-riscv64-linux-gnu",
}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. znver4, skylake-avx512), so codegen uses all its features."""
    from tvm.target.codegen import llvm_get_system_cpu

    return str(llvm_get_system_cpu())


def resolve_target(target: dict[str, Any]) -> dict[str, Any]:
    """A copy of a TVM target dict with mcpu 'native' replaced by the host CPU name."""
    resolved = dict(target)
    if resolved.get("mcpu") == "native":
        resolved["mcpu"] = host_cpu()
    return resolved


def runs_on_host(target: dict[str, Any]) -> bool:
    """True when code for this target can be run (and checked) on this machine."""
    triple = target.get("mtriple")
    if target.get("kind", "llvm") != "llvm":
        return False
    if not triple:
        return True
    machine = platform.machine().lower()
    return triple.split("-")[0] == _ARCH_ALIASES.get(machine, machine)


def _export(model: Any, example: Any) -> Any:
    import torch
    from torch.export import Dim

    batch = Dim("batch", min=1)
    example2 = example[:1].repeat(2, *([1] * (example.dim() - 1)))
    try:
        with quiet_torch_export():
            return torch.export.export(exportable(model), (example2,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch raises many types (UserError, Unsupported, ...)
        raise export_failed("torch.export", model, e) from e


def _import(ep: Any, model: Any) -> Any:
    """The exported program as a Relax module, or EngineUnsupported naming the ops TVM's importer lacks."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with quiet_torch_export():  # the importer re-runs torch's decompositions
            return from_exported_program(ep, keep_params_as_input=False)
    except Exception as e:  # AssertionError (unknown ops), NotImplementedError, ValueError, KeyError, ...
        ops = re.search(r"Unsupported function types? (\[.*?\]|\S+)", str(e))
        what = f"it has no translation for {ops.group(1)}" if ops else f"{type(e).__name__}: {first_line(e)}"
        raise EngineUnsupported(
            f"TVM's PyTorch importer cannot translate {type(model).__name__}: {what}. Leave tvm out of "
            "benchmark.engines for this model, or replace the op with one TVM supports"
        ) from e


def _output_names(ep: Any) -> list[str]:
    from torch.export.graph_signature import OutputKind

    return [str(s.arg.name) for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]


def _library_exporter(target: dict[str, Any], cross_compiler: str | None) -> Any:
    """fcompile for export_library: the system compiler for the host, a cross gcc otherwise."""
    if cross_compiler is None and not runs_on_host(target):
        cross_compiler = f"{target['mtriple']}-gcc"
    if cross_compiler is None:
        return None
    if shutil.which(cross_compiler) is None:
        package = CROSS_COMPILER_PACKAGES.get(cross_compiler, "the cross gcc for this target")
        raise StageError(
            f"cannot link the TVM library for target {target.get('mtriple')}: cross compiler "
            f"{cross_compiler!r} is not on PATH; install it (Debian: apt-get install {package})"
        )
    from tvm.support import cc

    return cc.cross_compiler(cross_compiler)


def build_tvm(
    model: Any,
    example: Any,
    target: dict[str, Any],
    out_dir: Path,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    cross_compiler: str | None = None,
    tolerance: float = 1e-3,
    pad_channels: bool = True,
    tuning_db: Path | None = None,
    tuning_budget_s: float = 0.0,
) -> dict[str, Any]:
    """Compile model to out_dir/model.so (+ meta.json); returns the meta, with max abs diff vs PyTorch.

    pad_channels: widen pruned channel counts to whole vector registers first (exact; see
    pad_channels.py). tuning_db / tuning_budget_s: tune the schedule per kernel for up to that many
    seconds on this CPU (tvm_tune), re-using and filling the database; a cross-compiled target only
    reads the database.
    """
    import torch
    import tvm

    from tasks.engines.pad_channels import pad_channels as widen
    from tasks.engines.tvm_schedule import vector_lanes
    from tasks.engines.tvm_tune import tune

    if example.dim() < 2:
        raise ValueError(f"example must be a batch (N, ...) of inputs, got shape {tuple(example.shape)}")
    target = resolve_target(target)
    fcompile = _library_exporter(target, cross_compiler)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A rebuild that dies half-way must not leave the old meta vouching for a new library.
    (out_dir / META).unlink(missing_ok=True)
    model = model.eval()
    example = example.detach().to(torch.float32).cpu()

    tvm_target = tvm.target.Target(target)
    lanes = vector_lanes(tvm_target)
    compiled, padding = widen(model, example, lanes) if pad_channels else (model, {"padded": False})
    # Export and import first: a model TVM cannot take is refused before any time goes into tuning.
    ep = _export(compiled, example)
    mod = _import(ep, model)
    knobs, tuning = {}, None
    if tuning_db is not None:
        budget = tuning_budget_s if runs_on_host(target) else 0.0
        try:
            knobs, tuning = tune(compiled, example, tvm_target, tuning_db, budget_s=budget,
                                 batch_sizes=tuple(sorted(set(batch_sizes))))
        except Exception as e:  # tuning only picks knobs: the default schedule is correct
            log.warning("TVM tuning failed (%s: %s); building with default knobs", type(e).__name__, first_line(e))
            knobs, tuning = {}, {"skipped": f"tuning failed: {type(e).__name__}: {first_line(e)}"}
    lib_path, diffs = _compile_and_check(mod, model, example, target, tvm_target, knobs, out_dir, batch_sizes, fcompile)
    worst = max(diffs.values(), default=0.0)
    if worst > tolerance and knobs:
        # The default schedule is the reference one; a tuned variant that computes something else (seen
        # once in 20 tuned MobileNetV3 builds, 0.08 off) is dropped for this build, and said so.
        log.warning("TVM with tuned knobs differs from PyTorch by %.3g; rebuilding with default knobs", worst)
        tuning = {**(tuning or {}), "rejected": f"tuned knobs gave outputs {worst:.3g} off PyTorch; default knobs used"}
        knobs = {}
        lib_path, diffs = _compile_and_check(mod, model, example, target, tvm_target, knobs, out_dir, batch_sizes,
                                             fcompile)
        worst = max(diffs.values(), default=0.0)
    if worst > tolerance:
        # No meta.json: load_tvm refuses the library, which is kept for a bug report.
        # Not a skip: a library that builds and computes something else is a bug (TVM's or our
        # schedule's) that must be seen, not a limit of what TVM can express.
        raise StageError(
            f"TVM output differs from PyTorch by {worst:.3g} (tolerance {tolerance:g}) for target "
            f"{target}; the library in {out_dir} is wrong. Report it with that folder and try "
            "another target (e.g. without mcpu), or leave tvm out of benchmark.engines, meanwhile"
        )

    meta = {
        "engine": "tvm",
        "library": LIBRARY,
        "sha256": sha256_file(lib_path),
        "input_shape": [None, *[int(d) for d in example.shape[1:]]],
        "input_dtype": "float32",
        "batch": {"dynamic": True, "min": 1, "max": None},
        "output_names": _output_names(ep),
        "target": target,
        "tvm_version": tvm.__version__,
        "torch_version": torch.__version__,
        "pipeline": "shrinkflow cpu_pipeline (legalize+fuse, NHWC conv, parallel/vector schedule, "
        + (f"tuned: {len(knobs)} kernels)" if knobs else "default knobs)"),
        "vector_lanes": lanes,
        "channel_padding": padding,
        "tuning": tuning,
        "max_abs_diff": max(diffs.values()) if diffs else None,
        "max_abs_diff_by_batch": diffs,
        "verified_on_host": bool(diffs),
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _compile_and_check(mod: Any, model: Any, example: Any, target: dict[str, Any], tvm_target: Any,
                       knobs: dict[str, Any], out_dir: Path, batch_sizes: Any, fcompile: Any) -> tuple[Path, dict[str, float]]:
    """Compile `mod` with `knobs`, write the library atomically, and (on the host) its max |diff| vs
    PyTorch per batch size ({} when cross-compiled: the benchmark checks it on the device)."""
    import tvm

    from tasks.engines.tvm_schedule import cpu_pipeline

    try:
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target, knobs))
    except Exception as e:  # tvm.error.* from a pass or LLVM: TVM cannot build this graph
        raise EngineUnsupported(
            f"TVM {tvm.__version__} cannot compile {type(model).__name__} for {target.get('mtriple') or 'this CPU'} "
            f"({type(e).__name__}: {first_line(e)})"
        ) from e
    # Write next to the final name and rename: a crash never leaves a half-written model.so.
    lib_path = out_dir / LIBRARY
    tmp_path = out_dir / (LIBRARY + ".tmp.so")
    if fcompile is None:
        executable.export_library(str(tmp_path))
    else:
        executable.export_library(str(tmp_path), fcompile=fcompile)
    tmp_path.replace(lib_path)
    if not runs_on_host(target):
        return lib_path, {}
    runner = TVMRunner(lib_path, tuple([None, *example.shape[1:]]))
    return lib_path, diff_vs_reference(model, runner, example, batch_sizes)


class TVMRunner:
    """A compiled library in a Relax VM on the CPU; `.run(x)` takes float32 NCHW, returns logits."""

    def __init__(self, lib_path: Path, input_shape: tuple[int | None, ...]):
        import tvm
        from tvm import relax

        # Must precede TVM's first parallel kernel: a pinned one-thread pool pins the calling
        # thread, and every torch/ONNX Runtime thread started from it later, to a single core.
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        self.input_shape = tuple(input_shape)
        self._lib_path = Path(lib_path)
        self._tvm = tvm
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
        self._main = self._vm["main"]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch x of shape input_shape (any batch size)."""
        x = check_input(x, self.input_shape, f"TVM library {self._lib_path}")
        out = self._main(self._tvm.runtime.tensor(x))
        # Models return a tuple in Relax even for one output; the logits are its first element.
        first = out[0] if not hasattr(out, "numpy") else out
        return first.numpy()


REBUILD = "re-run the compile stage to rebuild it"


def read_meta(out_dir: Path) -> dict[str, Any]:
    """out_dir/meta.json, after checking that it is complete and that model.so matches its sha256."""
    out_dir = Path(out_dir)
    meta_path, lib_path = out_dir / META, out_dir / LIBRARY
    if not meta_path.is_file():
        raise ArtifactError(f"{meta_path} is missing: the TVM build did not finish; {REBUILD}")
    try:
        meta = json.loads(meta_path.read_text())
        meta["input_shape"] = tuple(meta["input_shape"])
        expected_sha = meta["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"{meta_path} is unreadable ({e}); {REBUILD}") from e
    if not lib_path.is_file():
        raise ArtifactError(f"{lib_path} is missing; {REBUILD}")
    if sha256_file(lib_path) != expected_sha:
        raise ArtifactError(
            f"{lib_path} does not match the sha256 in {meta_path} (corrupt or from another build); {REBUILD}"
        )
    return meta


def load_tvm(out_dir: Path) -> TVMRunner:
    """Load out_dir/model.so after checking meta.json and the library's sha256."""
    out_dir = Path(out_dir)
    lib_path = out_dir / LIBRARY
    meta = read_meta(out_dir)
    if not runs_on_host(meta.get("target", {})):
        raise ArtifactError(
            f"{lib_path} was built for {meta['target'].get('mtriple')}, not this machine; "
            "run it on that device (TVM RPC) or rebuild for the host"
        )
    try:
        return TVMRunner(lib_path, meta["input_shape"])
    except Exception as e:  # tvm raises its own error types for unloadable libraries
        raise ArtifactError(f"TVM cannot load {lib_path} ({type(e).__name__}: {e}); {REBUILD}") from e


# ------------------------------------------------------------------ engine adapter (tasks/engines/__init__.py)


def build(job: BuildJob) -> dict[str, Any]:
    """The model compiled for job.device (cross-compiled when it is another architecture)."""
    return build_tvm(job.model, job.example, job.device.tvm_target(), job.out, batch_sizes=job.batch_sizes,
                     cross_compiler=job.device.cross_compiler, pad_channels=job.pad_channels,
                     tuning_db=job.tuning_db, tuning_budget_s=job.tuning_budget_s)


def load(artifact: Path, device: Device, *, threads: int) -> TVMRunner:
    return load_tvm(artifact)


def describe(meta: dict[str, Any]) -> str:
    padded = meta["channel_padding"]
    grown = ", ".join(f"{g['from']}->{g['to']}" for g in padded.get("groups", []))
    widths = f", channels padded to multiples of {padded['multiple']} ({grown})" if padded.get("padded") else ""
    if meta["max_abs_diff"] is None:  # cross-compiled: checked on the device by the benchmark
        return f"built (cross-compiled, not run here; {_tuning_line(meta)}{widths})"
    return f"max |diff| vs PyTorch {meta['max_abs_diff']:.2e}; {_tuning_line(meta)}{widths}"


def _tuning_line(meta: dict[str, Any]) -> str:
    t = meta.get("tuning")
    if not t:
        return "default schedule"
    if t.get("skipped"):
        return f"default schedule ({t['skipped']})"
    if t.get("rejected"):
        return f"default schedule ({t['rejected']})"
    if not meta.get("verified_on_host"):  # cross-compiled: nothing can be timed here
        return f"default knobs (tuning times kernels on this CPU only), {t['from_db']} kernels from the database"
    return (f"tuned {t['tuned']} kernels in {t['seconds']:.0f} s, {t['from_db']} from the database"
            + (f", {t['left_default']} left at defaults (budget spent)" if t["left_default"] else ""))
