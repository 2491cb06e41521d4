"""Knowledge distillation: the compressed student learns the base model's softened outputs."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from compression_ops.base import OpConfig, check_range


@dataclasses.dataclass
class Distill(OpConfig):
    """Logit KD (Hinton et al.): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""

    op = "distill"
    phase = "finetune"
    temperature: float = 4.0
    alpha: float = 0.7

    def validate(self) -> None:
        check_range("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        check_range("alpha", self.alpha, 0.0, 1.0)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: Distill,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    t = cfg.temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)  # T^2 keeps the soft term's gradient scale independent of T
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return cfg.alpha * soft + (1.0 - cfg.alpha) * hard
