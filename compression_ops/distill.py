"""Knowledge distillation: the compressed student learns the base model's softened outputs and,
optionally, its penultimate features (a FitNets-style hint through a learned linear adapter) and its
spatial attention maps at the end of every resolution stage (attention transfer)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from compression_ops.base import OpConfig, check_range


@dataclasses.dataclass
class Distill(OpConfig):
    """Logit KD (Hinton et al.): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""

    op = "distill"
    phase = "finetune"
    temperature: float = 4.0
    alpha: float = 0.7
    hint_weight: float = 0.0  # weight of the feature (hint) loss; 0 turns it off
    # weight of the attention-transfer loss (Zagoruyko & Komodakis 2017, who use 1000); 0 turns it off
    attention_weight: float = 0.0
    # the KD weight falls linearly from alpha to 0 over the fine-tune: the teacher guides the start, the
    # labels the end (a small student that keeps imitating its teacher for long fits the labels worse)
    alpha_decay: bool = False

    def validate(self) -> None:
        check_range("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("hint_weight", self.hint_weight, 0.0, 1000.0)
        check_range("attention_weight", self.attention_weight, 0.0, 1e5)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: Distill,
    label_smoothing: float = 0.0,
    alpha: float | None = None,
) -> torch.Tensor:
    """The KD loss; `alpha` overrides cfg.alpha (fit() passes the decayed weight under alpha_decay)."""
    a = cfg.alpha if alpha is None else alpha
    t = cfg.temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)  # T^2 keeps the soft term's gradient scale independent of T
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return a * soft + (1.0 - a) * hard


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The last nn.Linear of the model: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; a feature hint needs one")
    return linears[-1]


class FeatureHint:
    """Captures student and teacher penultimate features; `loss()` is the MSE through a linear adapter.

    The adapter maps the (possibly pruned, narrower) student features to the teacher's width; it is
    trained with the student (its parameters go to the optimizer) and discarded afterwards.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        s_lin, t_lin = classifier_layer(student), classifier_layer(teacher)
        self.adapter = nn.Linear(s_lin.in_features, t_lin.in_features, bias=False)
        if s_lin.in_features == t_lin.in_features:
            nn.init.eye_(self.adapter.weight)
        self.adapter.to(s_lin.weight.device)  # initialised on the CPU (the same draws there), then moved
        self._feats: dict[str, torch.Tensor] = {}
        self._handles = [
            s_lin.register_forward_pre_hook(lambda _m, args: self._feats.__setitem__("s", args[0])),
            t_lin.register_forward_pre_hook(lambda _m, args: self._feats.__setitem__("t", args[0])),
        ]

    def parameters(self):
        return self.adapter.parameters()

    def loss(self) -> torch.Tensor:
        s, t = self._feats["s"], self._feats["t"].detach()
        return F.mse_loss(self.adapter(s.flatten(1)), t.flatten(1))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _attention_map(f: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a feature map: channel mean of squared activations, flattened, unit norm."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def stage_ends(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules that end each resolution stage: per spatial size of the 4-D outputs seen in
    one forward pass (1x1 excluded), the last module to produce it."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, tuple(out.shape[2:])))
                                if isinstance(out, torch.Tensor) and out.dim() == 4 else None)
        for name, m in model.named_modules() if name
    ]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:2])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    last: dict[tuple[int, ...], str] = {}
    for name, size in seen:
        if size != (1, 1):
            last[size] = name
    return list(last.values())


class AttentionTransfer:
    """Captures student and teacher feature maps at the teacher's stage ends (the student, a pruned copy,
    has the same module names; channel counts may differ, attention maps do not); `loss()` is
    sum over stages of mean((at_s - at_t)^2) / 2, as in the paper's code."""

    def __init__(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor):
        names = stage_ends(teacher, x)
        self.device = x.device
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.points = [n for n in names if n in s_mods]
        self._feats: dict[tuple[str, str], torch.Tensor] = {}
        self._handles = []
        for n in self.points:
            for side, mods in (("s", s_mods), ("t", t_mods)):
                self._handles.append(mods[n].register_forward_hook(
                    lambda _m, _i, out, key=(side, n): self._feats.__setitem__(key, out)))

    def loss(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for n in self.points:
            s, t = self._feats[("s", n)], self._feats[("t", n)].detach()
            if s.shape[2:] == t.shape[2:]:
                total = total + (_attention_map(s) - _attention_map(t)).pow(2).mean() / 2
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
