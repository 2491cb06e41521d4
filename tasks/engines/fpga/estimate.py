"""Resource estimate: analytic DSP/BRAM/latency figures of a built project (`estimate_resources`)
and their one-line summary (`estimate_line`). Not synthesis: see SYNTHESIS_NOTE."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tasks.engines.fpga.runner import _read_meta

SYNTHESIS_NOTE = (
    "Synthesis, place-and-route and bitstream generation need AMD vendor tools (Vitis HLS / Vivado), "
    "which are not installed here and were not run. Resource and latency figures are analytic "
    "estimates, not synthesis reports; run `vitis_hls -f build_prj.tcl` in the project on a machine "
    "with Vitis HLS for real ones."
)
# Default FPGA part: AMD Zynq UltraScale+ ZU7EV (ZCU104 board): 1728 DSP, 312 BRAM36, 230k LUT.
DEFAULT_PART = "xczu7ev-ffvc1156-2-e"
PART_RESOURCES = {  # for the "fits?" column of the estimate; from AMD's product tables
    "xczu7ev-ffvc1156-2-e": {"DSP": 1728, "BRAM18": 624, "LUT": 230400, "FF": 460800},
    "xcvu13p-flga2577-2-e": {"DSP": 12288, "BRAM18": 5376, "LUT": 1728000, "FF": 3456000},
    "xc7z020clg400-1": {"DSP": 220, "BRAM18": 280, "LUT": 53200, "FF": 106400},
}


# --------------------------------------------------------------------------- resource estimate


def _dsp_per_mult(a_bits: int, b_bits: int) -> int:
    """DSP48E2 slices (27 x 18-bit multipliers) per product. hls4ml's own rule (optimization API,
    VivadoDSPEstimator): an operand narrower than 9 bits maps the product to LUTs (0 DSP)."""
    if min(a_bits, b_bits) < 9:
        return 0
    return math.ceil(max(a_bits, b_bits) / 27) * math.ceil(min(a_bits, b_bits) / 18)


def estimate_resources(meta_or_dir: dict[str, Any] | Path | str, *, part: str | None = None,
                       clock_period_ns: float | None = None) -> dict[str, Any]:
    """An ANALYTIC estimate of multipliers, DSPs, BRAM and latency of the built project, from its layer
    table (meta['layers']). Not a synthesis result: AMD Vitis HLS / Vivado are needed for real figures,
    and they are not run here.

    Rules (stated in the result too):
      * multipliers: conv k*k*C_in*C_out / reuse_factor and dense n_in*n_out / reuse_factor (hls4ml's
        Latency strategy unrolls a conv over one output pixel, io_stream); batch-norm style rescales
        C / reuse_factor; non-zero weights only;
      * DSP48E2: multipliers whose narrower operand has >= 9 bits (the rule of hls4ml's optimization
        API, whose estimator itself imports TensorFlow and cannot be used here), ceil(a/27)*ceil(b/18)
        slices each; the others are LUT multipliers, reported with a rough 0.5 LUT per
        partial-product bit;
      * weights: Latency strategy keeps them in LUTs/registers (counted as bits); Resource strategy puts
        them in BRAM: ceil(n_weights * bits / (reuse_factor * 36)) BRAM36 (hls4ml's optimization API
        formula), i.e. twice that in BRAM18;
      * io_stream line buffers: (k-1) rows * width * C_in * bits per conv/pool, in BRAM18 (18 Kib each)
        when over 1 Kib, else registers;
      * latency, io_stream: every layer reads one pixel per cycle, and a conv spends reuse_factor
        cycles per output pixel: max(in_pixels, out_pixels * reuse_factor) cycles per image (a dense
        layer: reuse_factor); the layers run as a dataflow pipeline, so the interval is the slowest
        layer and the latency is bracketed by [slowest layer, sum of all layers] (+ 5 cycles of
        pipeline depth per layer).
    """
    if isinstance(meta_or_dir, str | Path):
        meta = _read_meta(Path(meta_or_dir))
    else:
        meta = meta_or_dir
    part = part or meta.get("part", DEFAULT_PART)
    clock = float(clock_period_ns or meta.get("clock_period_ns", 5.0))
    io_type = meta.get("io_type", "io_stream")
    strategy = meta.get("strategy", "Latency")
    rows = []
    tot = {"multipliers": 0, "dsp": 0, "lut_multipliers": 0, "lut_mult_estimate": 0, "weight_bits": 0,
           "bram18_weights": 0, "bram18_buffers": 0}
    cycles = []
    for L in meta["layers"]:
        cls = L["class"]
        rf = int(L.get("reuse_factor", 1) or 1)
        w = L.get("weights", {})
        mults = 0
        a_bits = b_bits = 0
        if cls in ("Conv2D", "Conv2DBatchnorm", "PointwiseConv2D", "Conv1D", "Dense"):
            wt = w.get("weight", {})
            mults = math.ceil(wt.get("nonzero", 0) / rf)
            b_bits = wt.get("bits", 0)
            a_bits = _in_bits(meta, L)
        elif cls in ("BatchNormalization", "ApplyAlpha"):
            sc = w.get("scale", {})
            n = int(L.get("n_filt", -1) or -1)
            n = sc.get("count", 0) if n in (-1, 0) else n
            mults = math.ceil(n / rf)
            b_bits = sc.get("bits", 0)
            a_bits = _in_bits(meta, L)
        per = _dsp_per_mult(a_bits, b_bits) if mults else 0
        dsp = mults * per
        lutm = 0 if per else mults
        lut_est = int(lutm * 0.5 * a_bits * b_bits)
        wbits = sum(v["count"] * v["bits"] for k, v in w.items() if k in ("weight",))
        bram_w = 0
        if strategy == "Resource" and rf > 1 and wbits:
            bram_w = 2 * math.ceil(wbits / (rf * 36))
        bram_buf = 0
        h_in, w_in = L.get("in_height"), L.get("in_width")
        kh = L.get("filt_height") or L.get("pool_height")
        if io_type == "io_stream" and kh and h_in and w_in and kh > 1:
            c_in = L.get("n_chan") or L.get("n_filt") or 1
            buf = (kh - 1) * w_in * c_in * (_in_bits(meta, L) or 16)
            bram_buf = math.ceil(buf / 18432) if buf > 1024 else 0
        c = _layer_cycles(L, rf, io_type)
        cycles.append((L["name"], c))
        rows.append({"name": L["name"], "class": cls, "reuse_factor": rf, "multipliers": mults,
                     "operand_bits": [a_bits, b_bits] if mults else None, "dsp": dsp, "lut_multipliers": lutm,
                     "weight_bits": wbits, "bram18": bram_w + bram_buf, "cycles_per_image": c})
        tot["multipliers"] += mults
        tot["dsp"] += dsp
        tot["lut_multipliers"] += lutm
        tot["lut_mult_estimate"] += lut_est
        tot["weight_bits"] += wbits
        tot["bram18_weights"] += bram_w
        tot["bram18_buffers"] += bram_buf
    interval = max(c for _, c in cycles) if cycles else 0
    depth = 5 * len(cycles)
    lat_lo, lat_hi = interval + depth, sum(c for _, c in cycles) + depth
    avail = PART_RESOURCES.get(part)
    est: dict[str, Any] = {
        "kind": "analytic estimate (not synthesis): " + SYNTHESIS_NOTE,
        "part": part,
        "clock_period_ns": clock,
        "io_type": io_type,
        "strategy": strategy,
        "totals": {**tot, "bram18": tot["bram18_weights"] + tot["bram18_buffers"]},
        "interval_cycles": interval,
        "latency_cycles": [lat_lo, lat_hi],
        "latency_us": [lat_lo * clock / 1000, lat_hi * clock / 1000],
        "throughput_images_per_s": (1e9 / (interval * clock)) if interval else None,
        "slowest_layer": max(cycles, key=lambda t: t[1])[0] if cycles else None,
        "layers": rows,
    }
    if avail:
        bram = est["totals"]["bram18"]
        est["part_resources"] = avail
        est["fits"] = {
            "DSP": tot["dsp"] <= avail["DSP"],
            "BRAM18": bram <= avail["BRAM18"],
            "LUT (multipliers only)": tot["lut_mult_estimate"] <= avail["LUT"],
        }
    return est


def _layer_cycles(L: dict[str, Any], rf: int, io_type: str) -> int:
    """Cycles a layer needs per image. io_stream: it reads one pixel per cycle and a conv/dense spends
    reuse_factor cycles per output pixel; io_parallel: one pass of reuse_factor cycles (conv: per
    output pixel)."""
    cls = L["class"]
    out = L.get("output_shape") or [1]
    out_pix = int(np.prod(out[:-1])) if len(out) > 1 else 1
    if io_type != "io_stream":
        return rf * (out_pix if "Conv" in cls else 1)
    h, w = L.get("in_height"), L.get("in_width")
    in_pix = h * w if h and w else out_pix
    if "Conv" in cls:
        return max(in_pix, out_pix * rf)
    if cls == "Dense":
        return rf
    if "Pooling" in cls:
        return in_pix
    return out_pix


def _in_bits(meta: dict[str, Any], L: dict[str, Any]) -> int:
    """Width of a layer's (first) input type."""
    return int(L.get("input_bits") or 16)


def estimate_line(est: dict[str, Any]) -> str:
    """One line of an FPGA estimate: DSPs, BRAM, latency range and throughput."""
    t = est["totals"]
    lo, hi = est["latency_us"]
    tput = est.get("throughput_images_per_s")
    return (f"{t['dsp']} DSP, {t['bram18']} BRAM18, latency {lo:.1f}-{hi:.1f} us at "
            f"{1000 / est['clock_period_ns']:.0f} MHz" + (f", {tput:,.0f} images/s" if tput else ""))
