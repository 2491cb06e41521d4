"""FPGA flow: an int8 (or QAT) model as an hls4ml HLS project, run by its bit-accurate C simulation.

    meta = build_hls(quantized_model, example, out_dir)    # HLS C++ project + compiled C simulation
    runner = load_hls(out_dir)                              # runner.run(x_nchw_float32) -> logits
    agreement(runner, quantized_model, x, y)                # top-1 agreement and both accuracies
    estimate_resources(out_dir)                             # analytic DSP/BRAM/latency estimate

Modules (imports point one way: prepare <- precision <- build; runner and estimate read meta.json):
  * prepare.py: quantized layers -> HLS layers (prepare_for_hls, emulate, quantize_input);
  * precision.py: the fixed-point type of every layer and the "auto" reuse factors;
  * build.py: the hls4ml project and its compiled C simulation (build_hls; PROJECT, REQUIREMENT);
  * estimate.py: the analytic resource/latency estimate (estimate_resources, estimate_line;
    SYNTHESIS_NOTE, DEFAULT_PART, PART_RESOURCES);
  * runner.py: loading and running the C simulation (load_hls, HLSRunner, agreement; META_FILE, FORMAT).

What is real and what is not. The HLS C++ (firmware/) is what hls4ml (PyTorch frontend, Vitis
backend) writes for the model; the C simulation compiles that same C++ with the system g++ and
Xilinx's arbitrary-precision types (ap_fixed), so its outputs are bit-for-bit what the synthesised
hardware computes. Synthesis, place-and-route and a bitstream need AMD's vendor tools (Vitis HLS,
Vivado), which are not installed here: `build_hls` never runs them, and the resource and latency
figures of `estimate_resources` are analytic estimates, not synthesis reports. To synthesise, copy
out_dir to a machine with Vitis HLS and run `vitis_hls -f build_prj.tcl` (or hls4ml's
`hls_model.build()`).

How our quantization becomes fixed point (the model must hold fake-quant layers, the output of
compression_ops.quantize's quantize_int8 or qat):
  * every Conv2d/Linear becomes three hls4ml layers: a quantizer (BatchNorm with scale 1/s_act whose
    output type is ap_ufixed<b,b,AP_RND_CONV,AP_SAT>: round half to even and clamp to 0..2^b-1, as
    torch.fake_quantize does), the conv/dense on integer codes (weights are our int8/QAT codes held
    exactly as ap_fixed<w,w>, accumulators wide enough never to round or overflow), and a rescale
    (BatchNorm, per output channel: s_act * s_weight[c], plus the float bias, and any BatchNorm the
    PyTorch model kept, folded in);
  * the network input is quantized on the host exactly as torch does it (scale, zero point) and
    enters the FPGA as the integer codes q - zero_point, channels last;
  * real-valued tensors between layers (rescaled outputs, residual adds, ReLU, pooling) get
    ap_fixed types with integer bits from a worst-case bound propagated from the codes (so no
    overflow is possible) and `data_frac_bits` fractional bits (default: `guard_bits` = 12 bits finer
    than the finest activation step), rounded to nearest (AP_RND);
  * AdaptiveAvgPool2d becomes the equivalent AvgPool2d (hls4ml's PyTorch frontend has no adaptive
    pooling), nn.Identity (left by BatchNorm folding) and Dropout are dropped, and a quantizer that
    would follow a flatten is moved before it (per-tensor, so equivalent; hls4ml 1.3's io_stream
    code mis-sizes a BatchNorm placed right after the transpose it inserts before a flatten).
The inexact steps are the quantizer and rescale constants (`scale_bits` significant bits, 18: one
DSP48 operand) and the rounding of real-valued tensors to `data_frac_bits`: the C simulation differs
from the PyTorch simulation only where a value lies within ~2^-11 activation steps of a rounding
boundary, which flips that activation by one step. Measured on digits (ResNet-8 width 8, int8):
top-1 agreement 100 %, logits differ (by <= 0.12) on ~14 % of the images; scale_bits=24 and
guard_bits=16 make the C simulation match the float64 emulation on all but 1 of 359 images, at two
DSP48 per rescale multiplier.

Not supported by hls4ml's PyTorch frontend (1.3): grouped/depthwise convolutions (mobilenet_tiny),
ReLU6, and anything else outside hls4ml.converters.pytorch_to_hls.get_supported_pytorch_layers();
build_hls names the layer and raises StageError.
"""

from tasks.engines.fpga.build import PROJECT, REQUIREMENT, build_hls
from tasks.engines.fpga.estimate import (
    DEFAULT_PART,
    PART_RESOURCES,
    SYNTHESIS_NOTE,
    estimate_line,
    estimate_resources,
)
from tasks.engines.fpga.prepare import emulate, prepare_for_hls, quantize_input
from tasks.engines.fpga.runner import FORMAT, META_FILE, HLSRunner, agreement, load_hls

__all__ = [
    "DEFAULT_PART",
    "FORMAT",
    "META_FILE",
    "PART_RESOURCES",
    "PROJECT",
    "REQUIREMENT",
    "SYNTHESIS_NOTE",
    "HLSRunner",
    "agreement",
    "build_hls",
    "emulate",
    "estimate_line",
    "estimate_resources",
    "load_hls",
    "prepare_for_hls",
    "quantize_input",
]
