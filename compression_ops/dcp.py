"""Discrimination-aware channel importance, after DCP (Zhuang et al., NeurIPS 2018; PocketFlow's DCP).

DCP keeps the channels that help intermediate features *discriminate* between classes, not only the
ones with large weights. We follow its channel-selection criterion in one shot:

1. Auxiliary heads (global average pool + linear) are placed at the end of every spatial stage but the
   last: the last module output at each spatial resolution, in forward order, except the final
   resolution (the network's own classifier covers it) and 1x1 (already pooled) outputs. That is the
   end of each residual stage in a ResNet and of each stride group in a MobileNet, for any CNN that
   downsamples. A network that never downsamples gets one head at its middle 4-D output.
2. The heads are trained briefly on the labelled batches with the network frozen (eval mode).
3. With the heads frozen, the discrimination-aware loss L = final CE + sum of the heads' CE is
   back-propagated batch by batch; each conv/linear weight element accumulates its squared gradient.
4. A channel's score is ||dL/dW_c||^2 summed over batches, where W_c is the input-channel slice of
   each conv/linear that *consumes* the channel (DCP selects a layer's input channels this way). A
   Torch-Pruning group sums over all its consumers (residual adds couple several); a group with no
   conv/linear consumer falls back to its producers' output rows.

Close variants, on purpose: DCP grows the kept set greedily and re-solves the weights after each
choice, and pairs each stage only with its own head plus a feature-reconstruction term (whose gradient
is zero before anything is pruned). We score once, with all heads downstream of a layer at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compression_ops.base import forward_with_hooks

Batch = tuple[torch.Tensor, torch.Tensor]


def aux_points(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose outputs get an auxiliary head (see the module docstring for the rule)."""
    events: list[tuple[str, tuple[int, int]]] = []

    def hook(name: str):
        def fn(_m: nn.Module, _inp: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                events.append((name, tuple(out.shape[-2:])))

        return fn

    forward_with_hooks(model, example, {m: hook(name) for name, m in model.named_modules() if name})
    events = [e for e in events if e[1] != (1, 1)]
    if not events:
        return []
    last_at: dict[tuple[int, int], int] = {}
    for i, (_, hw) in enumerate(events):
        last_at[hw] = i
    ends = sorted(last_at.values())[:-1]  # the final resolution feeds the model's own classifier
    if not ends:
        ends = [len(events) // 2]
    return [events[i][0] for i in ends]


class _Taps:
    """Forward hooks that keep the spatially pooled output of some modules (pooled at once, so a later
    in-place op on the feature map cannot disturb autograd)."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.pooled: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            self.pooled[name] = out.mean(dim=(2, 3))

        return fn

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]


class DCPImportance:
    """Torch-Pruning importance: per channel, the squared gradient of the discrimination-aware loss
    with respect to the consumers' input slices. Call `prepare(model, batches)` before pruning.

    `prepare` leaves the per-element sum of squared gradients in each conv/linear `weight.grad`:
    Torch-Pruning slices `.grad` along with the weights, so the scores stay aligned while it prunes
    group after group (the Taylor criterion relies on the same).
    """

    def __init__(self, head_epochs: int = 30, head_lr: float = 0.01):
        import torch_pruning as tp

        # Reuse Torch-Pruning's group reduction and normalisation (mean over members, divide by mean).
        self._base = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
        self.head_epochs = head_epochs
        self.head_lr = head_lr
        self.report: dict[str, object] = {}

    def prepare(self, model: nn.Module, batches: list[Batch]) -> dict[str, object]:
        """Train the auxiliary heads, then accumulate squared gradients; returns a small report."""
        if not batches:
            raise ValueError("DCPImportance.prepare needs labelled batches")
        was_training = model.training
        model.eval()  # BN statistics are not to move; the network is frozen while the heads learn
        try:
            names = aux_points(model, batches[0][0][:1])
            heads, head_acc = self._train_heads(model, names, batches)
            self._accumulate(model, names, heads, batches)
        finally:
            model.train(was_training)
        self.report = {"aux_heads": names, "aux_head_accuracy": head_acc}
        return self.report

    def _train_heads(self, model: nn.Module, names: list[str], batches: list[Batch]) -> tuple[dict[str, nn.Linear], dict[str, float]]:
        taps = _Taps(model, names)
        feats: list[dict[str, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for x, _ in batches:
                    model(x)
                    feats.append(dict(taps.pooled))
        finally:
            taps.remove()
        num_classes = int(max(int(y.max()) for _, y in batches) + 1)
        with torch.no_grad():
            num_classes = max(num_classes, model(batches[0][0][:1]).shape[-1])
        heads = {n: nn.Linear(feats[0][n].shape[1], num_classes) for n in names}
        params = [p for h in heads.values() for p in h.parameters()]
        if params:
            opt = torch.optim.Adam(params, lr=self.head_lr)
            for _ in range(self.head_epochs):
                for f, (_, y) in zip(feats, batches, strict=True):
                    opt.zero_grad()
                    sum(F.cross_entropy(heads[n](f[n]), y) for n in names).backward()
                    opt.step()
        acc = {}
        with torch.no_grad():
            for n in names:
                hits = sum(int((heads[n](f[n]).argmax(1) == y).sum()) for f, (_, y) in zip(feats, batches, strict=True))
                acc[n] = hits / sum(len(y) for _, y in batches)
        for h in heads.values():
            h.requires_grad_(False)
        return heads, acc

    def _accumulate(self, model: nn.Module, names: list[str], heads: dict[str, nn.Linear], batches: list[Batch]) -> None:
        layers = _weighted_layers(model)
        sq = {m: torch.zeros_like(m.weight) for m in layers}
        taps = _Taps(model, names)
        try:
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                for n in names:
                    loss = loss + F.cross_entropy(heads[n](taps.pooled[n]), y)
                loss.backward()
                for m in layers:
                    if m.weight.grad is not None:
                        sq[m] += m.weight.grad.detach() ** 2
        finally:
            taps.remove()
        model.zero_grad(set_to_none=True)
        for m in layers:
            m.weight.grad = sq[m]

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        from torch_pruning.pruner import function

        consumers, producers = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            root_idxs = group[i].root_idxs
            if not isinstance(layer, nn.modules.conv._ConvNd | nn.Linear) or layer.weight.grad is None:
                continue
            g = layer.weight.grad
            if fn in (function.prune_conv_in_channels, function.prune_linear_in_channels):
                score = g.transpose(0, 1).flatten(1).sum(1)
                if fn == function.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    score = score.repeat(layer.groups)  # grouped conv: the weight holds in/groups slices
                consumers.append((score[idxs], root_idxs))
            elif fn in (function.prune_conv_out_channels, function.prune_linear_out_channels):
                producers.append((g[idxs].flatten(1).sum(1), root_idxs))
        chosen = consumers or producers
        if not chosen:
            return None
        scores = self._base._reduce([s for s, _ in chosen], [r for _, r in chosen])
        return self._base._normalize(scores, self._base.normalizer)
