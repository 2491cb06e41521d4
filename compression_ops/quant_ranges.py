"""Quantization grids and calibration ranges: the one place ranges and scales come from.

`choose_range` (activations, per tensor: minmax, percentile or MSE) and `weight_scales` (weights,
symmetric per output channel: max or MSE clipping) serve the PyTorch ops in quantize.py and the ONNX
int8 export in tasks/engines/onnx_int8.py alike.
"""

from __future__ import annotations

import torch

METHODS = ("minmax", "percentile", "mse")
WEIGHT_RANGES = ("max", "mse")
# Clipping thresholds the MSE search tries: i/100 of the observed extreme, i = 1..100.
MSE_CANDIDATES = 100
# MSE is evaluated on at most this many values (a fixed random subset) to bound the cost.
MSE_MAX_SAMPLES = 1 << 16
_EPS = 1e-12


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid: signed is symmetric (-(2^(b-1)-1) .. 2^(b-1)-1), unsigned is 0 .. 2^b - 1."""
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for ranges lo, hi of any (matching) shape; the range always contains 0."""
    qmin, qmax = qrange(bits, signed)
    if signed:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        return scale.clamp_min(_EPS), torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp


def _quant_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Sum of squared quantization error of x (n,) under each candidate range lo, hi (a,) -> (a,)."""
    scale, zp = qparams(lo, hi, bits, signed)
    qmin, qmax = qrange(bits, signed)
    s, z = scale[:, None], zp[:, None]
    q = (torch.round(x[None, :] / s) + z).clamp(qmin, qmax)
    return ((q - z) * s - x[None, :]).pow(2).sum(1)


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    # kthvalue has no size limit (torch.quantile refuses more than 2^24 values).
    k = min(x.numel(), max(1, round(q * (x.numel() - 1)) + 1))
    return x.kthvalue(k).values


def choose_range(
    samples: torch.Tensor,
    method: str = "minmax",
    *,
    bits: int = 8,
    signed: bool,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """Calibration range (lo, hi) of samples for `bits`-bit quantization.

    minmax: the extremes. percentile: the `percentile`-th percentile of |x| (signed) or the two tails
    (unsigned). mse: the clipping threshold among i/100 of the extremes (i = 1..100) that minimises the
    squared quantization error of the samples. Signed ranges are symmetric; unsigned ones contain 0.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    x = samples.detach().flatten().float()
    if x.numel() == 0:
        raise ValueError("choose_range got no samples")
    if signed:
        a = x.abs()
        if method == "percentile":
            t = _quantile(a, percentile / 100)
        else:
            t = a.max()
        if method == "mse":
            t = _mse_search(x, -t, t, bits, signed)[1]
        return -float(t), float(t)
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    if method == "percentile":
        lo = _quantile(x, 1 - percentile / 100).clamp(max=0.0)
        hi = _quantile(x, percentile / 100).clamp(min=0.0)
    elif method == "mse":
        lo, hi = _mse_search(x, lo, hi, bits, signed)
    return float(lo), float(hi)


def _mse_search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool):
    if x.numel() > MSE_MAX_SAMPLES:
        gen = torch.Generator().manual_seed(0)
        x = x[torch.randperm(x.numel(), generator=gen)[:MSE_MAX_SAMPLES]]
    alpha = torch.arange(1, MSE_CANDIDATES + 1, dtype=torch.float32) / MSE_CANDIDATES
    err = torch.cat([_quant_error(x, a * lo, a * hi, bits, signed) for a in alpha.split(25)])
    best = alpha[int(err.argmin())]
    return best * lo, best * hi


class RangeObserver:
    """Exact min/max plus a uniform random subsample (bottom-k by random key) of everything observed,
    so percentile and MSE calibration see all batches at bounded memory."""

    def __init__(self, max_samples: int = 1 << 18, seed: int = 0):
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._keys = torch.empty(0)
        self._values = torch.empty(0)
        self.lo = float("inf")
        self.hi = float("-inf")

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float().cpu()
        if x.numel() == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        keys = torch.cat([self._keys, torch.rand(x.numel(), generator=self._gen)])
        values = torch.cat([self._values, x])
        if keys.numel() > self.max_samples:
            keys, idx = keys.topk(self.max_samples, largest=False)
            values = values[idx]
        self._keys, self._values = keys, values

    def range(self, method: str, *, bits: int, signed: bool, percentile: float = 99.99) -> tuple[float, float]:
        if self._values.numel() == 0:
            raise ValueError("RangeObserver saw no data: calibration ran no batch through this tensor")
        if method == "minmax":  # exact, not from the subsample
            samples = torch.tensor([self.lo, self.hi])
        else:
            samples = self._values
        return choose_range(samples, method, bits=bits, signed=signed, percentile=percentile)


def weight_scales(w: torch.Tensor, bits: int, method: str = "max") -> torch.Tensor:
    """Per-output-channel symmetric scales (dim 0) of w; method "max" or "mse" (clipping search)."""
    if method not in WEIGHT_RANGES:
        raise ValueError(f"method={method!r}: expected one of {', '.join(WEIGHT_RANGES)}")
    w = w.detach().float().flatten(1)
    qmax = qrange(bits, signed=True)[1]
    absmax = w.abs().amax(1)
    if method == "mse":
        alpha = torch.arange(1, MSE_CANDIDATES + 1, dtype=w.dtype, device=w.device) / MSE_CANDIDATES
        errs = []
        for a in alpha.split(25):  # (candidates, channels, fan-in) at a time
            s = (a[:, None] * absmax[None, :] / qmax).clamp_min(_EPS)[..., None]
            errs.append(((torch.round(w / s).clamp(-qmax, qmax) * s - w) ** 2).sum(2))
        absmax = absmax * alpha[torch.cat(errs).argmin(0)]
    return (absmax / qmax).clamp_min(_EPS)


def quantize_weight_per_channel(w: torch.Tensor, bits: int, method: str = "max") -> torch.Tensor:
    """w fake-quantized per output channel (symmetric, `bits`); gradients pass straight through."""
    return fake_quant_weight(w, weight_scales(w, bits, method), bits)


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    zp = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    qmin, qmax = qrange(bits, signed=True)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zp, 0, qmin, qmax)
