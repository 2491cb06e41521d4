"""Run a Torch-Pruning pruner group by group, keeping only the groups the model survives.

Torch-Pruning plans every group (which channels, which heads) on the unpruned model; the groups touch
disjoint channels, so any subset of them can be pruned in any order. Before the real prune, the planned
groups are replayed on throwaway copies of the model and the example is run: a group whose prune raises,
or after which the output changes shape or stops being finite, is left out and reported. One copy and one
forward pass when everything works; a failing group is found by halving (a few more copies each).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compression_ops import attention as attn
from compression_ops.base import exception_gist

# The layers the report names (what a group's channels are counted by); norms and activations follow them.
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _out_width(m: nn.Module) -> int | None:
    """Output channels of a layer the report names (None for the rest)."""
    if isinstance(m, LAYERS):
        return m.weight.shape[0]
    return m.embed_dim if isinstance(m, nn.MultiheadAttention) else None


def output_problem(model: nn.Module, example: torch.Tensor, shape: Sequence[int]) -> str | None:
    """What is wrong with model(example) (raises, shape differs from `shape`, not finite), or None."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:  # any failure of a pruned model is a finding, not a crash
        return f"forward raises {exception_gist(e)}"
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        return f"output is a {type(out).__name__}, not a tensor"
    if tuple(out.shape) != tuple(shape):
        return f"output shape {tuple(out.shape)}, expected {tuple(shape)}"
    if not bool(torch.isfinite(out).all()):
        return "output has NaN or inf"
    return None


def attention_kwargs(
    modules: Sequence[nn.Module], atts: list[attn.Attention], ratio_of: Callable[[attn.Attention], float]
) -> dict[str, Any]:
    """MetaPruner arguments that remove whole heads (never head dims) at each attention's own ratio; fresh
    dicts every time, since MetaPruner's defaults are shared between calls and it writes into them.

    torch's nn.MultiheadAttention is Torch-Pruning's own: it narrows the embedding, by the same amount in
    every head (channel groups of num_heads) so the width still divides by the head count."""
    mha = {m: m.num_heads for m in modules if isinstance(m, nn.MultiheadAttention)}
    kwargs: dict[str, Any] = {"out_channel_groups": mha, "in_channel_groups": dict(mha), "num_heads": {}}
    if atts:
        kwargs.update(
            num_heads={p: a.heads for a in atts for p in a.projections},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio_dict={p: attn.head_ratio(a.heads, ratio_of(a)) for a in atts for p in a.projections},
        )
    return kwargs


class GroupPruner:
    """Prunes the groups a Torch-Pruning pruner plans, after a dry run on copies of the model."""

    def __init__(self, pruner: Any, model: nn.Module, atts: list[attn.Attention]):
        self.dg = pruner.DG
        self.model = model
        self.atts = atts
        self.names = {m: n for n, m in model.named_modules()}
        self.param_names = {p: n for n, p in model.named_parameters()}
        self.att_of = {p: a for a in atts for p in a.projections}
        self.groups = list(pruner.step(interactive=True))  # planned, nothing pruned yet

    def out_layers(self, group: Any) -> list[str]:
        """Names of the layers whose output channels the group removes."""
        return [
            self.names[dep.target.module] for dep, idxs in group
            if idxs and isinstance(dep.target.module, LAYERS) and self.dg.is_out_channel_pruning_fn(dep.handler)
        ]

    def head_cuts(self, group: Any) -> dict[str, list[int]]:
        """Attention name -> the heads this group removes (read before it is pruned)."""
        cuts = {}
        for dep, idxs in group:
            a = self.att_of.get(dep.target.module)
            if a is not None and idxs and self.dg.is_out_channel_pruning_fn(dep.handler):
                cuts[a.name] = attn.removed_heads(a, list(idxs))
        return cuts

    def _prune(self, group: Any, resolve: Callable[[Any], Any] | None, atts: dict[str, attn.Attention]) -> None:
        """Prune one group: in self.model, or (resolve given) in a copy whose attention modules are `atts`."""
        cuts = self.head_cuts(group)
        before = {a.name: a.heads for a in self.atts}
        if resolve is None:
            group.prune()
        else:  # the same handlers, applied to the copy's modules
            for dep, idxs in group:
                dep.handler.__self__.pruning_dim = dep.target.pruning_dim
                target = resolve(dep.target.module)
                new = dep.handler(target, list(idxs))
                if isinstance(dep.target.module, nn.Parameter):
                    owner, _, attr = self.param_names[dep.target.module].rpartition(".")
                    setattr(resolve(self.model.get_submodule(owner)), attr, new)
        for name, heads in cuts.items():
            attn.drop_per_head_params(atts[name], heads, before[name])
            attn.sync_attributes(atts[name])

    def _trial(self, chosen: list[int], example: torch.Tensor, shape: Sequence[int]) -> str | None:
        memo: dict[int, Any] = {}
        replica = copy.deepcopy(self.model, memo)
        atts = {a.name: a for a in attn.find_attention(replica)}
        try:
            for i in chosen:
                # memo maps each module and parameter to its copy; Torch-Pruning's op nodes stay as they are
                self._prune(self.groups[i], lambda obj: memo.get(id(obj), obj), atts)
        except Exception as e:  # a handler Torch-Pruning cannot apply here
            return f"pruning raises {exception_gist(e)}"
        return output_problem(replica, example, shape)

    def dry_run(self, example: torch.Tensor, shape: Sequence[int]) -> dict[int, str]:
        """Index of each planned group that breaks the model -> why."""
        bad: dict[int, str] = {}

        def search(idx: list[int]) -> None:
            problem = self._trial(idx, example, shape) if idx else None
            if problem is None:
                return
            if len(idx) == 1:
                bad[idx[0]] = problem
                return
            found = len(bad)
            search(idx[: len(idx) // 2])
            search(idx[len(idx) // 2:])
            if len(bad) == found:  # each half works alone: the failure needs groups of both
                bad.update({i: f"breaks the model together with other groups: {problem}" for i in idx})

        search(list(range(len(self.groups))))
        rest = [i for i in range(len(self.groups)) if i not in bad]
        problem = self._trial(rest, example, shape) if bad and rest else None
        if problem is not None:  # an interplay the halving did not isolate: keep the model whole
            bad.update({i: f"breaks the model together with other groups: {problem}" for i in rest})
        return bad

    def prune(self, example: torch.Tensor, shape: Sequence[int]) -> tuple[list[str], dict[str, str]]:
        """Dry-run, then prune the groups that keep the model working; (applied, skipped) layer names."""
        bad = self.dry_run(example, shape)
        widths = {n: _out_width(m) for n, m in self.model.named_modules() if _out_width(m)}
        heads = {a.name: a.heads for a in self.atts}
        skipped: dict[str, str] = {}
        for i, group in enumerate(self.groups):
            if i in bad:
                cuts = self.head_cuts(group)
                for name in cuts or self.out_layers(group):
                    skipped[name] = f"heads left unpruned: {bad[i]}" if cuts else bad[i]
            else:
                self._prune(group, None, {a.name: a for a in self.atts})
        applied = [
            n for n, m in self.model.named_modules()
            if n in widths and _out_width(m) < widths[n] or any(a.name == n and a.heads < heads[n] for a in self.atts)
        ]
        return applied, skipped
