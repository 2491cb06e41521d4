"""Deep Compression weight sharing (Han et al. 2016): k-means over each layer's weights, every weight
replaced by its centroid, centroids fine-tuned with the assignments fixed.

Every Conv2d and Linear weight is clustered (depthwise included) unless named in `skip`. Zeros are
pruned weights and stay zeros: only the nonzero weights are clustered, into at most 2^bits centroids,
so a dense layer has at most 2^bits distinct values and a sparse one 2^bits plus zero (what the packer
stores as bitmask + indices into the codebook). A weight that another op's hook zeroes during
fine-tuning (a gradual sparsity schedule) joins the zeros; apply Sparsify before KMeansQuant.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from compression_ops.base import OpConfig, OpConfigError, OpResult, TrainHook, check_range, register_op
from compression_ops.metrics import weight_bits
from compression_ops.packing import packing_report
from compression_ops.sparsity import layer_selection

INITS = ("linear", "density", "random")


def _check_bits(name: str, bits: Any) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise OpConfigError(f"{name}={bits!r}: expected a whole number of bits from 1 to 8")
    check_range(name, bits, 1, 8)


@dataclasses.dataclass
class KMeansQuant(OpConfig):
    """Share weights: each conv/linear layer keeps a codebook of 2^bits centroids.

    init: centroid initialisation, "linear" (evenly spaced between min and max: Han et al.'s best, it
        keeps the rare large weights), "density" (evenly spaced quantiles) or "random" (sampled weights).
    iters: at most this many Lloyd iterations per layer (stops early when assignments settle).
    per_layer_bits: layer name -> bits overriding `bits` for that layer. skip: layers left alone.
    """

    op = "kmeans"
    phase = "train"
    bits: int = 4
    init: str = "linear"
    iters: int = 30
    per_layer_bits: dict[str, int] | None = None
    skip: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        _check_bits("bits", self.bits)
        for name, b in (self.per_layer_bits or {}).items():
            _check_bits(f"per_layer_bits[{name!r}]", b)
        if self.init not in INITS:
            raise OpConfigError(f"init={self.init!r}: expected one of {', '.join(INITS)}")
        check_range("iters", self.iters, 1, 10_000)


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # 1-D: the nearest of sorted centroids is found by the midpoints between neighbours.
    return torch.bucketize(x, (c[1:] + c[:-1]) / 2)


def _means(x: torch.Tensor, idx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    cnt = torch.bincount(idx, minlength=len(c))
    sums = torch.zeros_like(c).index_add_(0, idx, x)
    return torch.where(cnt > 0, sums / cnt.clamp_min(1), c)  # an empty cluster keeps its centroid


def kmeans_1d(x: torch.Tensor, k: int, init: str = "linear", iters: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted centroids, index of each element's centroid) of 1-D k-means, in float64.

    With at most k distinct values the codebook is those values, exactly.
    """
    x = x.double()
    distinct = torch.unique(x)
    if len(distinct) <= k:
        return distinct, torch.searchsorted(distinct, x)
    xs = torch.sort(x).values
    if init == "linear":
        c = torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)
    elif init == "density":
        c = xs[torch.linspace(0, len(xs) - 1, k).round().long()]
    else:
        g = torch.Generator().manual_seed(seed)
        c = torch.sort(xs[torch.randperm(len(xs), generator=g)[:k]]).values
    idx = _assign(x, c)
    for _ in range(iters):
        c = torch.sort(_means(x, idx, c)).values
        new = _assign(x, c)
        if torch.equal(new, idx):
            break
        idx = new
    return _means(x, idx, c), idx


class _Layer:
    """One clustered layer: its centroids and every weight's cluster (index k = the pruned zeros)."""

    def __init__(self, module: nn.Module, centroids: torch.Tensor, assign: torch.Tensor):
        self.module, self.centroids, self.assign = module, centroids, assign
        self.initial = centroids.clone()

    @property
    def k(self) -> int:
        return len(self.centroids)

    def tie(self) -> None:
        w = self.module.weight
        table = torch.cat([self.centroids, self.centroids.new_zeros(1)])
        with torch.no_grad():
            w.copy_(table[self.assign].to(w.dtype).reshape(w.shape))

    def update(self) -> None:
        """Each centroid becomes the mean of its (optimizer-updated) weights; then re-tie."""
        flat = self.module.weight.detach().reshape(-1).double()
        self.assign[(flat == 0) & (self.assign != self.k)] = self.k  # zeroed by another op: stays pruned
        sums = torch.zeros(self.k + 1, dtype=torch.float64).index_add_(0, self.assign, flat)
        cnt = torch.bincount(self.assign, minlength=self.k + 1)
        self.centroids = torch.where(cnt[: self.k] > 0, sums[: self.k] / cnt[: self.k].clamp_min(1), self.centroids)
        self.tie()

    def distinct(self) -> int:
        return int(torch.unique(self.module.weight.detach()).numel())


def cluster_layer(module: nn.Module, bits: int, init: str, iters: int, seed: int) -> _Layer:
    """Cluster `module.weight` in place (nonzeros only) and return its codebook state."""
    flat = module.weight.detach().reshape(-1).double()
    nz = flat != 0
    c, idx = kmeans_1d(flat[nz], 2**bits, init, iters, seed)
    assign = torch.full((flat.numel(),), len(c), dtype=torch.long)
    assign[nz] = idx
    layer = _Layer(module, c, assign)
    layer.tie()
    module.weight_bits = bits
    return layer


class CodebookHook(TrainHook):
    """After each optimizer step, moves every centroid to the mean of its weights and re-ties the weights
    (the mean of the updates is the per-cluster gradient sum of Han et al., scaled by the cluster size)."""

    def __init__(self, model: nn.Module, layers: dict[str, _Layer]):
        self.model, self.layers = model, layers

    @property
    def centroids(self) -> dict[str, torch.Tensor]:
        return {n: layer.centroids for n, layer in self.layers.items()}

    def after_step(self, step: int, total_steps: int, lr: float | None = None) -> None:
        for layer in self.layers.values():
            layer.update()

    def finish(self) -> dict[str, Any]:
        shift = {
            n: float((layer.centroids - layer.initial).abs().mean()) if layer.k else 0.0
            for n, layer in self.layers.items()
        }
        return {
            "hook": "kmeans",
            "distinct_values": {n: layer.distinct() for n, layer in self.layers.items()},
            "centroid_shift_mean": sum(shift.values()) / max(len(shift), 1),
            "packed_bytes": packing_report(self.model)["packed_bytes"],
        }


@register_op(KMeansQuant)
def kmeans_quant(model: nn.Module, cfg: KMeansQuant, data: Any = None) -> OpResult:
    """Cluster a copy of `model`; the hook fine-tunes the codebooks with the assignments fixed."""
    model = copy.deepcopy(model)
    before = packing_report(model)["packed_bytes"]
    targets, skipped = layer_selection(model, cfg.skip)
    odd = [n for n in cfg.per_layer_bits or {} if n not in targets]
    if odd:
        raise OpConfigError(
            f"per_layer_bits names {odd}, which are not conv/linear layers being clustered; "
            f"names look like {list(targets)[:3]}"
        )
    layers: dict[str, _Layer] = {}
    report_layers: dict[str, dict[str, Any]] = {}
    err = norm = 0.0
    for i, (name, mod) in enumerate(targets.items()):
        bits = (cfg.per_layer_bits or {}).get(name, cfg.bits)
        w0 = mod.weight.detach().clone()
        layers[name] = cluster_layer(mod, bits, cfg.init, cfg.iters, cfg.seed + i)
        err += float((mod.weight.detach() - w0).pow(2).sum())
        norm += float(w0.pow(2).sum())
        report_layers[name] = {
            "bits": bits, "centroids": layers[name].k, "distinct": layers[name].distinct(), "weights": w0.numel(),
        }
    packed = packing_report(model)["packed_bytes"]
    report = {
        "op": cfg.op,
        "bits": cfg.bits,
        "init": cfg.init,
        "layers_clustered": len(layers),
        "layers": report_layers,
        "applied": list(layers),
        "skipped": skipped,
        "weight_bits": weight_bits(model),
        "weight_rel_error": (err / norm) ** 0.5 if norm else 0.0,
        "packed_bytes": packed,
        "packed_bytes_before": before,
        "packed_ratio": packed / before,
    }
    return OpResult(model, report, [CodebookHook(model, layers)])
