"""An untuned but fast Relax pipeline for CPUs: NHWC convolutions plus a simple loop schedule.

Without a schedule, TVM's legalized operators run as naive single-threaded loops (8-50x slower than
PyTorch here), and TVM 0.27's DLight has CPU rules only for GEMV and softmax-like reductions.
This module adds one generic rule, applied to every fused PrimFunc:

* inline padding and elementwise producers into their consumer;
* reductions (conv, matmul, mean): reorder loops to [spatial..] [reduction..] [block] [vector],
  fuse the outer spatial loops (batch included) into one parallel loop, vectorize the innermost
  spatial loop, and unroll a small block of a second spatial loop so each vector load feeds several
  FMAs (register blocking); the fused epilogue (BN, residual add, ReLU) is computed under the same
  parallel loop while its input is still in cache; a row that is not 1, 2 or 4 whole registers
  (pruned widths such as 24, 45, 48) is split into register-sized vectors, since LLVM compiles one
  odd-sized vector (<45 x float>) 10-20x slower;
* elementwise blocks: parallel outer loops, vectorized inner loop.

Convolutions are converted to NHWC/HWIO first, so the output channel is the contiguous, vectorized
axis (weights are re-laid out once, at compile time; the input and any op ConvertLayout does not
know, such as clip for ReLU6, get a transpose). On a MobileNet-style model, NHWC for the depthwise
convolutions too beat keeping them NCHW (fewer transposes between layers).

A PrimFunc the rule cannot schedule keeps its naive (correct, slow) loops, with a warning.
The rule has a few knobs per kernel (`Knobs`: how many accumulators a register block keeps, how a
long row is split); `default_knobs` suits the register file, and `tvm_tune` times the candidates of
each kernel on this CPU and keeps the fastest in a tuning database. MetaSchedule, TVM's own tuner,
crashes in 0.27.0.post1 (tvm::ffi::ToJSONGraph), so it is not used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Innermost spatial extents up to this are vectorized whole; LLVM splits them into legal vectors.
MAX_VECTOR_EXTENT = 64
# Largest unrolled register block: accumulators = block x vectors-per-row must fit the register file.
MAX_REGISTER_BLOCK = 8
# Channels last: the output channel becomes the contiguous axis that the schedule vectorizes.
CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def _const(e: Any) -> int | None:
    from tvm import tirx

    if isinstance(e, int):
        return e
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _vars_in(region: Any) -> set[Any]:
    from tvm.tirx.analysis import undefined_vars

    return {v for rng in region.region for v in undefined_vars(rng.min)}


def _is_pow2_multiple(ext: int, lanes: int) -> bool:
    """ext is lanes x 2^k: LLVM splits such a vector into whole registers cleanly (16, 32, 64)."""
    n, r = divmod(ext, lanes)
    return r == 0 and n & (n - 1) == 0


def _register_block(
    sch: Any,
    info: Any,
    spatial: list[Any],
    vec_ext: int,
    lanes: int,
    row_vectors: int,
    accumulators: int,
) -> tuple[int, int] | None:
    """(index into spatial, factor) of the loop to unroll so each vector-loaded input is re-used."""
    reads = [_vars_in(r) for r in sch.get(info.block_rv).reads]
    # Inputs loaded as vectors are those indexed by the vector axis; an axis one of them does not
    # depend on re-uses the loaded vector on every unrolled step (input rows in NCHW, weights in NHWC).
    vector_inputs = [used for used in reads if spatial[-1].var in used]
    vectors_per_row = math.ceil(vec_ext / lanes) * row_vectors
    cap = max(1, min(MAX_REGISTER_BLOCK, accumulators // vectors_per_row))
    for i in range(len(spatial) - 2, -1, -1):
        ext = _const(spatial[i].dom)
        if ext is None or ext < 2 or all(spatial[i].var in used for used in vector_inputs):
            continue
        factor = max(k for k in range(1, cap + 1) if ext % k == 0)
        if factor > 1:
            return i, factor
    return None


@dataclass(frozen=True)
class Knobs:
    """One point of the schedule's tuning space, for one kernel.

    accumulators: vector accumulators a register block may keep live (the register file bounds it:
        16 on AVX2, 32 on AVX-512; spilling them costs more than the re-use gains).
    row_split: how a vector row longer than one register (24, 56 channels) is covered: "outer" puts
        the register-sized pieces in the outer (parallel) loops, so the block's accumulators are one
        register each; "unroll" unrolls them inside the reduction, so each loaded input is re-used
        by every piece (more re-use, more registers).
    """

    accumulators: int = 12
    row_split: str = "outer"

    def key(self) -> str:
        return f"acc{self.accumulators}-{self.row_split}"


def default_knobs(lanes: int) -> Knobs:
    """Untuned knobs for a vector width: 3/4 of the register file as accumulators, rows split outside."""
    registers = 32 if lanes >= 16 else 16  # AVX-512 has 32 vector registers; AVX2, NEON (128-bit) 16+
    return Knobs(accumulators=registers * 3 // 4, row_split="outer")


def _schedule_func(func: Any, lanes: int, knobs: Knobs | None = None) -> Any | None:
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

    knobs = knobs or default_knobs(lanes)
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    try_inline_contiguous_spatial(sch, infos)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    placed: set[str] = set()
    for idx, info in enumerate(infos):
        kinds = info.dom_kind()
        if info.name in placed or "O" in kinds or "S" not in kinds:
            continue
        spatial = [it for it in info.iters if it.kind == "S"]
        reduction = [it.loop_rv for it in info.iters if it.kind == "R"]
        vec_ext = _const(spatial[-1].dom) or 0
        outer = [it.loop_rv for it in spatial]
        vec_loop = []
        if len(spatial) >= 2 and vec_ext >= 2:
            inner = max(k for k in range(1, MAX_VECTOR_EXTENT + 1) if vec_ext % k == 0)
            if inner >= 2:
                row = outer.pop()
                if inner < vec_ext:
                    # A long row (e.g. 128 channels) is split; its outer part joins the parallel loops.
                    row_outer, row = sch.split(row, factors=[None, inner])
                    outer.append(row_outer)
                vec_loop, vec_ext = [row], inner
        vectorize = bool(vec_loop)
        row_unrolled, row_vectors = [], 1
        split_row = vectorize and vec_ext > lanes and (
            reduction and knobs.row_split == "outer" or not _is_pow2_multiple(vec_ext, lanes)
        )
        if split_row:
            # LLVM turns a row that is not a power-of-two number of registers (24, 45 or 48 floats)
            # into very slow code (10-20x): vectorize a divisor that fits one register and cover
            # the rest by an outer or unrolled loop; a row with no such divisor (a prime) is split
            # in registers with a tail.
            width = max(k for k in range(1, lanes + 1) if vec_ext % k == 0)
            if width * 2 <= lanes:
                width = lanes
            row_outer, vec_loop[0] = sch.split(vec_loop[0], factors=[None, width])
            if reduction and knobs.row_split == "outer":
                outer.append(row_outer)
            else:
                row_unrolled, row_vectors = [row_outer], math.ceil(vec_ext / width)
            vec_ext = width
        unrolled = []
        picked = None
        if reduction and vectorize:
            picked = _register_block(sch, info, spatial, vec_ext, lanes, row_vectors, knobs.accumulators)
        if picked is not None:
            i, factor = picked
            lo, li = sch.split(outer[i], factors=[None, factor])
            outer[i] = lo
            unrolled = [li]
        unrolled += row_unrolled
        sch.reorder(*outer, *reduction, *unrolled, *vec_loop)
        par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(par)
        if vectorize:
            sch.vectorize(vec_loop[0])
        for loop in unrolled:
            sch.unroll(loop)
        if reduction:
            _place_epilogue(sch, infos, idx, par, placed, lanes)
            sch.decompose_reduction(info.block_rv, reduction[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _place_epilogue(sch: Any, infos: list[Any], idx: int, par: Any, placed: set[str], lanes: int) -> None:
    """Compute the elementwise block after a reduction under its parallel loop (cache-hot input)."""
    if idx + 1 >= len(infos) or not infos[idx + 1].is_injective():
        return
    nxt = infos[idx + 1]
    try:
        sch.reverse_compute_at(nxt.block_rv, par)
    except Exception:  # a schedule error only means "leave it as its own loop nest"
        return
    loops = sch.get_loops(nxt.block_rv)
    ext = _const(sch.get(loops[-1]).extent)
    if len(loops) > 1 and ext is not None and 2 <= ext <= MAX_VECTOR_EXTENT:
        loop = loops[-1]
        if ext > lanes and not _is_pow2_multiple(ext, lanes):
            width = max(k for k in range(1, lanes + 1) if ext % k == 0)
            if width >= 2:  # as in the main rule: whole registers, not one odd-sized vector
                _, loop = sch.split(loop, factors=[None, width])
        sch.vectorize(loop)
    placed.add(nxt.name)


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest usable vector register: 16 (AVX-512), 8 (AVX/AVX2), 4.

    Read from the CPU features, not LLVM's vector width: LLVM 20 reports 512 bits for znver3, an
    AVX2-only CPU, and 16-float vectors there cost 2 registers each (measured: 3-30x slower kernels).
    """
    from tvm.target.codegen import llvm_get_vector_width, target_has_features

    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple or triple.startswith(("x86_64", "i686", "i386")):
        try:
            if target_has_features("avx512f", target):
                return 16
            return 8 if target_has_features("avx", target) else 4  # SSE: 4 floats
        except Exception:  # a target LLVM cannot query: fall back to LLVM's width
            pass
    bits = llvm_get_vector_width(target)
    return max(4, min(16, (bits if bits > 0 else 128) // 32))


def device_lanes(device: Any) -> int:
    """float32 lanes of a registry device's vector registers (8 on AVX2, 16 on AVX-512)."""
    import tvm

    return vector_lanes(tvm.target.Target(device.tvm_target()))


def cpu_schedule_pass(target: Any, knobs: dict[str, Knobs] | None = None) -> Any:
    """Module pass applying the rule above to every unscheduled PrimFunc; failures keep naive loops.

    knobs: tuned knobs by kernel name (tvm_tune); a kernel not named gets default_knobs.
    """
    import tvm
    from tvm import tirx

    lanes = vector_lanes(target)

    @tvm.transform.module_pass(opt_level=0, name="ShrinkflowCPUSchedule")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updates, failed = {}, []
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs and "tirx.is_scheduled" in func.attrs):
                continue
            try:
                new = _schedule_func(func, lanes, (knobs or {}).get(gv.name_hint))
            except Exception as e:  # fall back to the correct, unscheduled loops
                failed.append(f"{gv.name_hint}: {type(e).__name__}")
                new = None
            if new is not None:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        if failed:
            log.warning("TVM CPU schedule left %d kernels unscheduled (slow): %s", len(failed), failed)
        return mod

    return _pass


def _convert_layout_or_keep() -> Any:
    """ConvertLayout to NHWC, or the module as it is (NCHW: correct, slower convs) where TVM's pass fails.

    TVM 0.27's ConvertLayout dies with std::bad_alloc on Swin's graph (window partition: reshapes,
    strided slices and roll's take); everything after it compiles that graph fine without it.
    """
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="ShrinkflowConvertLayout")
    def _pass(mod: Any, _ctx: Any) -> Any:
        try:
            return relax.transform.ConvertLayout(CONV_LAYOUT)(mod)
        except Exception as e:  # tvm.error.InternalError and friends: a TVM bug, not the model's
            log.warning("TVM ConvertLayout failed (%s: %s); convolutions stay NCHW", type(e).__name__,
                        str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
            return mod

    return _pass


def prepare_passes(target: Any) -> list[Any]:
    """The Relax passes before scheduling: library dispatch, BN folding, NHWC, legalize to PrimFuncs."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from tasks.engines.tvm_fold import fold_constants_pass

    return (
        cpu.library_dispatch_passes(target)
        + [
            # Batch norm becomes scale/shift that FuseOps folds into the conv's epilogue.
            relax.transform.DecomposeOpsForInference(),
            # Drops the (out, mean, var) tuple BN leaves behind, which would block fusing the ReLU.
            relax.transform.CanonicalizeBindings(),
            _convert_layout_or_keep(),
            # The weight transposes and BN constants, in numpy: FoldConstant compiles each with LLVM.
            fold_constants_pass(),
            relax.transform.CanonicalizeBindings(),
        ]
        + cpu.legalize_passes(target)
    )


def cpu_pipeline(target: Any, knobs: dict[str, Knobs] | None = None) -> Any:
    """The Relax CPU pipeline (legalize, fold, fuse, lower) with NHWC convs and the schedule above."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="ShrinkflowCPUPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                prepare_passes(target)
                + [cpu_schedule_pass(target, knobs)]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
