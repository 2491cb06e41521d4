"""Make a net ready to be cut: sparsity-inducing training before channel pruning.

A short distillation from the unpruned net (its own teacher), with one of three regularisers applied as a
proximal step after every optimizer step:

- ``grow``: growing regularisation (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021).
  The cut is planned first, on the trained net; only the channels it will remove are decayed, by a factor
  that grows from 0 over the first half of the training, so the rest of the net learns to do without them
  while they fade. At the cut they are near zero and removing them changes little.
- ``group_lasso``: group-norm regularisation over whole channel groups (every weight that a channel's
  removal deletes, in every layer the dependency graph ties to it: Torch-Pruning's GroupNormPruner). The
  proximal step of the group lasso shrinks each channel group's norm by lr x strength, to exactly 0 for
  the weak ones; magnitude importance then finds them.
- ``bn_l1``: network slimming (Liu et al. 2017): the L1 proximal step on BatchNorm scales.

A channel group is a list of slices (parameter, dimension, indices) aligned on the group root's channel
index, read from Torch-Pruning's groups, so residual adds and concatenations are followed as the cut does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compression_ops.base import TrainHook

METHODS = ("grow", "group_lasso", "bn_l1")
# Strength per method when the config leaves it unset. grow: how far the doomed channels fade, whatever
# the number of steps: their weights end multiplied by about e^-strength. The group lasso's and bn_l1's:
# the penalty weight (their shrink per step is lr x strength), set for a short budget:
# at lr 0.01 (cosine) one epoch of Fashion-MNIST (938 steps) shrinks every channel group's norm by ~0.9
# and every BN scale by ~0.2; sparse training over a whole training run (Torch-Pruning's recipes) uses
# far weaker penalties for far more steps.
DEFAULT_STRENGTH = {"grow": 10.0, "group_lasso": 0.2, "bn_l1": 0.05}


@dataclasses.dataclass
class Slice:
    param: nn.Parameter
    dim: int
    idx: torch.Tensor  # positions along `dim`
    root: torch.Tensor  # the group root's channel each position belongs to
    roots: int = -1  # how many root channels, max(root) + 1: read once here, not at every step

    def __post_init__(self) -> None:  # the indices follow the weights' device (CUDA training)
        self.idx, self.root = self.idx.to(self.param.device), self.root.to(self.param.device)
        if self.roots < 0:
            self.roots = int(self.root.max()) + 1 if self.root.numel() else 0


def _group_slices(group: Any, graph: Any) -> list[Slice]:
    """The weights one Torch-Pruning group removes: out-channel rows of convs/linears (and their biases),
    BN scales and shifts, and the in-channel columns of the layers that consume them."""
    from torch_pruning._helpers import to_plain_idxs, to_root_idxs

    out: list[Slice] = []
    for dep, idxs in group:
        m = dep.target.module
        if not idxs or not isinstance(m, nn.Module):
            continue
        idx = torch.as_tensor(to_plain_idxs(list(idxs)), dtype=torch.long)
        root = torch.as_tensor(to_root_idxs(list(idxs)), dtype=torch.long)
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(m, nn.Conv2d | nn.Linear):
            if is_out:
                out.append(Slice(m.weight, 0, idx, root))
                if m.bias is not None:
                    out.append(Slice(m.bias, 0, idx, root))
            elif not (isinstance(m, nn.Conv2d) and m.groups > 1):  # depthwise convs are cut as outputs
                out.append(Slice(m.weight, 1, idx, root))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and is_out:
            out.append(Slice(m.weight, 0, idx, root))
            out.append(Slice(m.bias, 0, idx, root))
    return out


def group_norms(groups: list[list[Slice]]) -> list[torch.Tensor]:
    """Per group, the L2 norm of each root channel's weights across all its slices."""
    norms = []
    for slices in groups:
        n = max(s.roots for s in slices) if slices else 0
        sq = torch.zeros(n, device=slices[0].param.device if slices else None)
        with torch.no_grad():
            for s in slices:
                w = s.param.detach().index_select(s.dim, s.idx).float()
                per = w.transpose(0, s.dim).reshape(len(s.idx), -1).pow(2).sum(1)
                sq.index_add_(0, s.root, per)
        norms.append(sq.sqrt())
    return norms


def _scale_slices(slices: Iterable[Slice], factor: torch.Tensor | float) -> None:
    """Multiply each slice's weights by `factor` (a scalar, or one value per root channel)."""
    with torch.no_grad():
        for s in slices:
            f = factor if isinstance(factor, float) else factor[s.root]
            if isinstance(f, torch.Tensor):
                shape = [1] * s.param.dim()
                shape[s.dim] = len(s.idx)
                f = f.to(s.param.dtype).reshape(shape)
            s.param.index_copy_(s.dim, s.idx, s.param.index_select(s.dim, s.idx) * f)


class Regularizer(TrainHook):
    """The proximal step of one method, after every optimizer step of fit(): group_lasso and bn_l1 shrink
    by the step's learning rate x strength (fit() passes it), grow by its own schedule."""

    def __init__(self, method: str, strength: float, groups: list[list[Slice]], bns: list[nn.Module]):
        if method not in METHODS:
            raise ValueError(f"regularize={method!r}: expected one of {', '.join(METHODS)}")
        self.method, self.strength, self.groups, self.bns = method, strength, groups, bns

    def after_step(self, step: int, total_steps: int, lr: float | None = None) -> None:
        if lr is None and self.method != "grow":
            raise ValueError(f"regularize={self.method!r} needs the step's learning rate: call after_step(step, total, lr)")
        if self.method == "grow":
            # the decay ramps up linearly over the first half, then holds: its sum over the run is strength
            half = max(1, total_steps // 2)
            peak = self.strength / (0.75 * max(total_steps, 1))
            decay = min(0.5, peak * min(1.0, (step + 1) / half))
            _scale_slices((s for g in self.groups for s in g), 1.0 - decay)
        elif self.method == "group_lasso":
            tau = lr * self.strength
            for slices, norm in zip(self.groups, group_norms(self.groups), strict=True):
                _scale_slices(slices, torch.clamp(1.0 - tau / norm.clamp_min(1e-12), min=0.0))
        else:  # bn_l1: soft-threshold the BN scales
            tau = lr * self.strength
            with torch.no_grad():
                for bn in self.bns:
                    w = bn.weight
                    w.copy_(torch.sign(w) * torch.clamp(w.abs() - tau, min=0.0))


def plan_groups(pruner: Any, model: nn.Module, all_channels: bool) -> list[list[Slice]]:
    """Channel groups as slices: the channels `pruner` plans to remove (all_channels=False: grow's targets),
    or every prunable channel of every group it would consider (the group lasso's)."""
    from compression_ops import prune_plan

    graph = pruner.DG
    if all_channels:
        groups = graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
    else:
        groups = prune_plan.GroupPruner(pruner, model, []).groups
    return [s for s in (_group_slices(g, graph) for g in groups) if s]


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def summary(before: list[torch.Tensor], after: list[torch.Tensor]) -> dict[str, float]:
    """Mean channel-group norm before and after the regularised training, and the fraction near zero."""
    b, a = torch.cat(before) if before else torch.zeros(0), torch.cat(after) if after else torch.zeros(0)
    if not len(b):
        return {"channels": 0}
    small = float((a < 1e-3 * b.mean().clamp_min(1e-12)).float().mean())
    return {"channels": len(b), "norm_before_mean": float(b.mean()), "norm_after_mean": float(a.mean()),
            "near_zero_fraction": small}
