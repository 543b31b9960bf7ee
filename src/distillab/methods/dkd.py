"""`dkd`: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022), as in mdistiller.

KD splits into a target-class term (TCKD: KL between the binary [p_g, 1 - p_g] distributions) and a
non-target term (NCKD: KL between the distributions over the non-target classes), re-weighted:
L = ce_weight * CE + warmup * (alpha * TCKD + beta * NCKD), both terms carrying T^2.

Warm-up: mdistiller counts epochs from 1 and uses min(epoch / warmup, 1), so the factor is 1/warmup in
the first epoch and 1 from epoch `warmup` on. `self.epoch` is 0-based, hence min((epoch + 1) / warmup, 1).
CIFAR-100 defaults: alpha 1, beta 8 (2 or 6 for some pairs, see the configs), T 4, warm-up 20 epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.methods.base import Method, MethodOptions, register

_MASK_LOGIT = 1000.0  # subtracted from the target logit (after / T) to drop it from the non-target softmax


def _binary_kl(p_teacher: torch.Tensor, p_student: torch.Tensor) -> torch.Tensor:
    """Per-sample KL([p_t, 1 - p_t] || [p_s, 1 - p_s]) from the target probabilities."""
    teacher = torch.stack([p_teacher, 1 - p_teacher], dim=1)
    student = torch.stack([p_student, 1 - p_student], dim=1)
    return F.kl_div(torch.log(student), teacher, reduction="none").sum(dim=1)


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T^2 * mean over the batch of its KL, unweighted."""
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    target = F.one_hot(labels, z_s.shape[1]).bool()
    p_s_target = F.softmax(z_s, dim=1)[target]
    p_t_target = F.softmax(z_t, dim=1)[target]
    tckd = _binary_kl(p_t_target, p_s_target).mean()
    log_q_s = F.log_softmax(z_s - _MASK_LOGIT * target, dim=1)
    log_q_t = F.log_softmax(z_t - _MASK_LOGIT * target, dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (no warm-up: callers scale it)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


def warmup_factor(epoch: int, warmup: int) -> float:
    """mdistiller's min(epoch / warmup, 1) with epochs counted from 1; `epoch` here is 0-based."""
    return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)


class DKDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    alpha: float = Field(1.0, ge=0, description="TCKD weight")
    beta: float = Field(8.0, ge=0, description="NCKD weight (CIFAR-100: 8, or 2/6 for some pairs)")
    temperature: float = Field(4.0, gt=0)
    warmup: int = Field(20, ge=0, description="epochs of linear warm-up of the DKD terms (0: none)")


@register("dkd")
class DKD(Method):
    Options = DKDOptions
    caches_teacher = True

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        o = self.opts
        tckd, nckd = dkd_terms(logits, teacher_logits, labels, o.temperature)
        ramp = warmup_factor(self.epoch, o.warmup)
        return logits, {
            "ce": o.ce_weight * F.cross_entropy(logits, labels),
            "tckd": ramp * o.alpha * tckd,
            "nckd": ramp * o.beta * nckd,
        }
