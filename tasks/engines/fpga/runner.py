"""Load / run: the compiled C simulation of a built project (`load_hls`, `HLSRunner`), its meta.json
and firmware checks, and the top-1 `agreement` of a runner with a reference."""

from __future__ import annotations

import ctypes
import hashlib
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.engines.base import check_input, sha256_file
from tasks.engines.fpga.prepare import quantize_input
from tasks.errors import ArtifactError

META_FILE = "meta.json"
FORMAT = 1


# --------------------------------------------------------------------------- load / run


def _firmware_digest(prj: Path) -> str:
    """sha256 over the generated HLS sources (firmware/ minus the compiled library), names included."""
    h = hashlib.sha256()
    fw = prj / "firmware"
    for p in sorted(fw.rglob("*")):
        rel = p.relative_to(prj).as_posix()
        if not p.is_file() or p.suffix == ".so" or rel.startswith("firmware/ap_types/"):
            continue
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _read_meta(out_dir: Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    rebuild = "rebuild it with tasks.engines.fpga.build_hls"
    if not out_dir.is_dir():
        raise ArtifactError(f"HLS project {out_dir} is missing; {rebuild}")
    p = out_dir / META_FILE
    if not p.is_file():
        raise ArtifactError(f"{p} is missing: {out_dir} is not a complete HLS project; {rebuild}")
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p} is unreadable ({e}); {rebuild}") from e
    if not isinstance(meta, dict) or meta.get("engine") != "hls4ml":
        raise ArtifactError(f"{p} is not the meta of an hls4ml project; {rebuild}")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{p} has format {meta.get('format')!r}, this code reads {FORMAT}; {rebuild}")
    need = ("library", "library_sha256", "firmware_sha256", "input_shape", "input_quant", "num_outputs",
            "project_name", "layers")
    lacking = [k for k in need if k not in meta]
    if lacking:
        raise ArtifactError(f"{p} lacks {lacking}; {rebuild}")
    lib = Path(str(meta["library"]))
    if lib.is_absolute() or ".." in lib.parts or lib.suffix != ".so":
        raise ArtifactError(f"{p} names library {meta['library']!r}, not a .so inside the project; {rebuild}")
    return meta


class HLSRunner:
    """The compiled C simulation of an hls4ml project: float32 NCHW in, logits (float64 -> float32) out.

    Each image is quantized on the host (meta['input_quant']), transposed to channels last and run
    through the C simulation one at a time (hls4ml's streaming C++ keeps static state: calls are
    serialised by a lock)."""

    _lock = threading.Lock()

    def __init__(self, out_dir: Path, meta: dict[str, Any], *, verify: bool = True):
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.input_shape = tuple(meta["input_shape"])
        lib = self.out_dir / meta["library"]
        rebuild = "rebuild it with tasks.engines.fpga.build_hls"
        if not lib.is_file():
            raise ArtifactError(f"the C-simulation library {lib} is missing; {rebuild}")
        if verify:
            got = sha256_file(lib)
            if got != meta["library_sha256"]:
                raise ArtifactError(f"{lib} has sha256 {got[:12]}..., its meta.json says "
                                    f"{meta['library_sha256'][:12]}...: the library is corrupt or from another "
                                    f"build; {rebuild}")
            fw = _firmware_digest(self.out_dir)
            if fw != meta["firmware_sha256"]:
                raise ArtifactError(f"the HLS sources in {self.out_dir / 'firmware'} do not match the ones the "
                                    f"C simulation was compiled from (edited or from another build); {rebuild}")
        try:
            self._lib = ctypes.CDLL(str(lib))
            fn = getattr(self._lib, f"{meta['project_name']}_double")
        except (OSError, AttributeError) as e:
            raise ArtifactError(f"{lib} cannot be loaded as the C simulation of {meta['project_name']} ({e}); "
                                f"{rebuild}") from e
        self._n_out = int(meta["num_outputs"])
        fn.restype = None
        fn.argtypes = [np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")] * 2
        self._fn = fn

    def run(self, x: np.ndarray) -> np.ndarray:
        x = check_input(x, self.input_shape, "the FPGA C simulation")
        codes = quantize_input(x, self.meta["input_quant"])
        if codes.ndim == 4:
            codes = codes.transpose(0, 2, 3, 1)  # NCHW -> NHWC: hls4ml streams channels last
        codes = np.ascontiguousarray(codes.reshape(len(codes), -1), dtype=np.float64)
        out = np.zeros((len(codes), self._n_out), dtype=np.float64)
        with self._lock:
            for i in range(len(codes)):
                self._fn(codes[i], out[i])
        return out.astype(np.float32)


def load_hls(out_dir: Path) -> HLSRunner:
    """A runner for the project build_hls wrote; ArtifactError when it is missing, corrupt or mismatched
    (meta.json, the C-simulation library's sha256, the HLS sources it was compiled from)."""
    out_dir = Path(out_dir)
    return HLSRunner(out_dir, _read_meta(out_dir))


# --------------------------------------------------------------------------- agreement


def agreement(runner: Any, reference: Any, x: np.ndarray, y: Sequence[int] | np.ndarray | None = None,
              *, batch_size: int = 256) -> dict[str, Any]:
    """Top-1 agreement of runner with the reference (a torch model, e.g. the fake-quant one, or its
    logits as an array) on x, and the accuracy of both on labels y when given (percent)."""
    x = np.asarray(x, dtype=np.float32)
    if isinstance(reference, np.ndarray):
        ref = reference
    else:
        import torch

        reference.eval()
        with torch.inference_mode():
            ref = np.concatenate([reference(torch.from_numpy(x[i:i + batch_size])).numpy()
                                  for i in range(0, len(x), batch_size)])
    t = time.perf_counter()
    got = runner.run(x)
    dt = time.perf_counter() - t
    if got.shape != ref.shape:
        raise ValueError(f"runner gives {got.shape}, reference {ref.shape}")
    res: dict[str, Any] = {
        "n": len(x),
        "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        "max_abs_diff_logits": float(np.abs(got - ref).max()),
        "mean_abs_diff_logits": float(np.abs(got - ref).mean()),
        "seconds_per_image": dt / max(len(x), 1),
    }
    if y is not None:
        y = np.asarray(y)
        res["accuracy"] = 100.0 * float((got.argmax(1) == y).mean())
        res["reference_accuracy"] = 100.0 * float((ref.argmax(1) == y).mean())
    return res
