"""Build: the hls4ml project of a fake-quant model and its compiled bit-accurate C simulation
(`build_hls`), with the meta.json the runner and the estimate read."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.engines.base import EngineUnsupported, sha256_file
from tasks.engines.fpga.estimate import DEFAULT_PART, SYNTHESIS_NOTE, estimate_resources
from tasks.engines.fpga.precision import _auto_reuse, _choose_precisions
from tasks.engines.fpga.prepare import _Prepared, prepare_for_hls
from tasks.engines.fpga.runner import FORMAT, META_FILE, HLSRunner, _firmware_digest
from tasks.errors import StageError

PROJECT = "shrinkflow_fpga"
# Requirement line for pyproject.toml (the PyTorch frontend needs neither TensorFlow nor Keras).
REQUIREMENT = "hls4ml>=1.3,<1.4"


# --------------------------------------------------------------------------- build


def _gxx_version() -> str:
    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "missing"


def _hls4ml():
    try:
        import hls4ml
    except ImportError as e:
        raise StageError(f"the FPGA flow needs hls4ml ({e}); install it with `pip install '{REQUIREMENT}'`") from e
    return hls4ml


@contextlib.contextmanager
def _yaml_torch_placeholder():
    """hls4ml dumps its config, the PyTorch model included, to hls4ml_config.yml with yaml.dump, which
    pickles an fx GraphModule and fails; write a short tag for any nn.Module instead, for the duration."""
    import yaml
    from torch import nn

    had = "yaml_multi_representers" in yaml.Dumper.__dict__
    saved = dict(yaml.Dumper.yaml_multi_representers)

    def rep(dumper, m):
        return dumper.represent_scalar("!pytorch_model", f"{type(m).__name__} (not serialised)")

    yaml.add_multi_representer(nn.Module, rep)
    try:
        yield
    finally:
        if had:
            yaml.Dumper.yaml_multi_representers = saved
        else:
            del yaml.Dumper.yaml_multi_representers


def build_hls(
    model: Any,
    example: Any,
    out_dir: Path,
    *,
    quant: dict[str, Any] | None = None,
    backend: str = "Vitis",
    io_type: str = "io_stream",
    strategy: str = "Latency",
    reuse_factor: int | str = "auto",
    part: str = DEFAULT_PART,
    clock_period_ns: float = 5.0,
    data_frac_bits: int | None = None,
    guard_bits: int = 12,
    scale_bits: int = 18,
    rounding: bool = True,
    check: tuple[Any, ...] | None = None,
) -> dict[str, Any]:
    """Convert a fake-quant model (quantize_int8 / qat output) into an hls4ml project in out_dir and
    compile its bit-accurate C simulation with the system g++; returns (and writes) meta.json.

    quant: the quantization op's report (OpResult.report), recorded in meta and checked against the
        model's per-layer weight bits; None to take everything from the model's fake-quant layers.
    io_type: "io_stream" (default: line-buffered streaming convolutions, the hls4ml choice for CNNs)
        or "io_parallel" (every tensor in registers; only for tiny inputs).
    reuse_factor: multiplications per multiplier (1 = fully parallel) for every layer, or "auto": per
        conv/dense layer the largest valid one that keeps the layer within the cycles the largest image
        takes to stream through (a balanced dataflow pipeline: same throughput as 1, far fewer
        multipliers in the deep layers). hls4ml moves a value to the nearest valid one per layer; meta
        records what each layer got.
    data_frac_bits: fractional bits of real-valued tensors; None: finest activation step + guard_bits.
    scale_bits: significant bits of the quantizer and rescale constants.
    rounding: real-valued tensors and constants round to nearest (AP_RND; one adder each) rather than
        truncate (AP_TRN, hls4ml's default): half the error and no downward bias.
    check: optional (x, reference_logits) to record the C simulation's top-1 agreement in meta.

    The project is built in a temporary directory beside out_dir and renamed into place at the end, so
    a failure leaves no half project (a previous out_dir is replaced only on success). Synthesis is not
    run: it needs AMD Vitis HLS / Vivado (see SYNTHESIS_NOTE).
    """
    hls4ml = _hls4ml()
    if io_type not in ("io_stream", "io_parallel"):
        raise ValueError(f"io_type={io_type!r}: expected 'io_stream' or 'io_parallel'")
    if strategy not in ("Latency", "Resource"):
        raise ValueError(f"strategy={strategy!r}: expected 'Latency' or 'Resource'")
    if reuse_factor != "auto" and not (isinstance(reuse_factor, int) and reuse_factor >= 1):
        raise ValueError(f"reuse_factor={reuse_factor!r}: expected an integer >= 1 or 'auto'")
    if shutil.which("g++") is None:
        raise StageError("the C simulation needs the system C++ compiler: install g++ (apt-get install g++)")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    prep = prepare_for_hls(model, example)
    if quant is not None:
        _check_quant_report(quant, prep)
    prec, info, bounds, frac = _choose_precisions(prep, data_frac_bits, scale_bits, guard_bits, rounding)

    from hls4ml.converters import convert_from_pytorch_model
    from hls4ml.utils import config_from_pytorch_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _yaml_torch_placeholder():
            try:
                cfg = config_from_pytorch_model(
                    prep.model, prep.input_shape, granularity="name", backend=backend,
                    default_precision="ap_fixed<16,6>",
                    default_reuse_factor=1 if reuse_factor == "auto" else reuse_factor,
                    channels_last_conversion="internal", transpose_outputs=False,
                )
            except Exception as e:  # hls4ml raises bare Exception for unsupported layers
                raise EngineUnsupported(f"hls4ml's PyTorch frontend cannot convert the model: {e}. Supported layers: "
                                 f"{_supported_layers()}") from e
            cfg["Model"]["Strategy"] = strategy
            layer_cfg = cfg["LayerName"]
            if reuse_factor == "auto":
                for name, rf in _auto_reuse(prep, backend).items():
                    layer_cfg[name]["ReuseFactor"] = rf
            missing = [n for n in layer_cfg if n not in prec]
            if missing:
                raise EngineUnsupported(f"no precision derived for hls4ml layers {missing}; this model has an operation "
                                 "build_hls does not know how to bound")
            for name, lc in layer_cfg.items():
                p = lc.setdefault("Precision", {})
                for k, v in prec[name].items():
                    if k in p or k == "result":
                        p[k] = v
                for k, v in list(p.items()):
                    if v == "auto":  # only the ones we do not know (e.g. activation tables): harmless
                        p[k] = prec[name].get("result", "ap_fixed<16,6>")
            hls_model = convert_from_pytorch_model(
                prep.model, output_dir=str(tmp), project_name=PROJECT, backend=backend, part=part,
                clock_period=clock_period_ns, io_type=io_type, hls_config=cfg, write_weights_txt=False,
            )
        t_conv = time.perf_counter()
        with contextlib.redirect_stdout(log), _yaml_torch_placeholder():
            try:
                hls_model.compile()
            except Exception as e:
                tail = log.getvalue()[-3000:]
                raise StageError(f"the C simulation did not compile with g++ ({e}); compiler output:\n{tail}") from e
        t_comp = time.perf_counter()
        libs = sorted((tmp / "firmware").glob(f"{PROJECT}-*.so"))
        if len(libs) != 1:
            raise StageError(f"expected one compiled C-simulation library in {tmp / 'firmware'}, found {libs}")
        layers = _layer_table(hls_model, prec, info)
        meta: dict[str, Any] = {
            "engine": "hls4ml",
            "format": FORMAT,
            "hls4ml_version": hls4ml.__version__,
            "backend": backend,
            "part": part,
            "clock_period_ns": clock_period_ns,
            "io_type": io_type,
            "strategy": strategy,
            "reuse_factor": reuse_factor,
            "project_name": PROJECT,
            "library": libs[0].relative_to(tmp).as_posix(),
            "library_sha256": sha256_file(libs[0]),
            "firmware_sha256": _firmware_digest(tmp),
            "compiler": _gxx_version(),
            "input_shape": [None, *prep.input_shape],
            "hls_input_layout": "NHWC" if len(prep.input_shape) == 3 else "NF",
            "input_quant": prep.input_quant,
            "num_outputs": prep.num_outputs,
            "data_frac_bits": frac,
            "scale_bits": scale_bits,
            "rounding": "AP_RND" if rounding else "AP_TRN",
            "precisions": prec,
            "layer_roles": info,
            "bounds": {k: [float(a), float(b)] for k, (a, b) in bounds.items()},
            "layers": layers,
            "model_changes": prep.changes,
            "quant": _jsonable(quant) if quant is not None else None,
            "quantized_layers": {n: {"weight_bits": q.weight_bits, "act_bits": q.act_bits, "act_scale": q.act_scale,
                                     "act_zero_point": q.act_zp} for n, q in prep.qlayers.items()},
            "synthesis": SYNTHESIS_NOTE,
            "convert_seconds": t_conv - t0,
            "compile_seconds": t_comp - t_conv,
        }
        meta["estimate"] = estimate_resources(meta)
        runner = HLSRunner(tmp, meta, verify=False)
        if check is not None:
            x, ref = check
            got = runner.run(np.asarray(x, dtype=np.float32))
            ref = np.asarray(ref)
            meta["check"] = {"n": len(ref), "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                             "max_abs_diff_logits": float(np.abs(got - ref).max())}
        else:
            runner.run(np.zeros((1, *prep.input_shape), dtype=np.float32))  # the library loads and runs
        meta["build_seconds"] = time.perf_counter() - t0
        (tmp / "build.log").write_text(log.getvalue())
        _write_json(tmp / META_FILE, meta)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move tmp to out_dir; an existing out_dir is set aside first and removed after the swap."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _supported_layers() -> str:
    from hls4ml.converters.pytorch_to_hls import get_supported_pytorch_layers

    return ", ".join(sorted(get_supported_pytorch_layers()))


def _check_quant_report(quant: dict[str, Any], prep: _Prepared) -> None:
    per_layer = quant.get("per_layer_bits")
    if isinstance(per_layer, dict):
        got = {n: q.weight_bits for n, q in prep.qlayers.items()}
        diff = {n: (b, got.get(n)) for n, b in per_layer.items() if got.get(n) != b}
        if diff:
            raise StageError(f"the quantization report does not match the model (layer: (report bits, model "
                             f"bits)) {diff}; pass the report of the op that produced this model")
    act = quant.get("act_bits")
    if isinstance(act, int) and act and any(q.act_bits != act for q in prep.qlayers.values()):
        raise StageError(f"the quantization report says act_bits={act}, the model's layers differ; pass the "
                         "report of the op that produced this model")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _layer_table(hls_model: Any, prec: dict, info: dict) -> list[dict[str, Any]]:
    """What the estimate needs of each hls4ml layer: class, sizes, reuse factor, types."""
    rows = []
    for layer in hls_model.get_layers():
        a = layer.attributes
        row: dict[str, Any] = {"name": layer.name, "class": layer.class_name}
        for k in ("n_in", "n_out", "n_chan", "n_filt", "in_height", "in_width", "out_height", "out_width",
                  "filt_height", "filt_width", "stride_height", "stride_width", "pool_height", "pool_width",
                  "reuse_factor", "strategy", "n_scale_bias"):
            v = a.get(k) if hasattr(a, "get") else None
            if v is not None and not callable(v):
                row[k] = v if isinstance(v, int | float | str) else str(v)
        with contextlib.suppress(Exception):  # layers without an input variable (the input layer)
            p_in = layer.get_input_variable().type.precision
            row["input_bits"] = int(getattr(p_in, "width", 0) or 0)
        out = layer.get_output_variable()
        row["output_shape"] = [int(s) for s in out.shape]
        row["result_t"] = str(out.type.precision.definition_cpp()) if hasattr(out.type.precision, "definition_cpp") \
            else str(out.type.precision)
        for wname, w in layer.weights.items():
            p = w.type.precision
            row.setdefault("weights", {})[wname] = {
                "count": int(np.prod(w.shape)) if w.shape else 1,
                "nonzero": int(np.count_nonzero(w.data)),
                "bits": int(getattr(p, "width", 0) or 0),
                "type": p.definition_cpp() if hasattr(p, "definition_cpp") else str(p),
            }
        if layer.name in info:
            row["role"] = info[layer.name].get("role")
        rows.append(row)
    return rows
