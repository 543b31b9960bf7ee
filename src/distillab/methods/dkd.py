"""`dkd`: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022), as in mdistiller.

KD splits into a target-class term (TCKD: KL between the binary [p_g, 1 - p_g] distributions) and a
non-target term (NCKD: KL between the distributions over the non-target classes), re-weighted:
L = ce_weight * CE + warmup * (alpha * TCKD + beta * NCKD), both terms carrying T^2.

Warm-up: mdistiller counts epochs from 1 and uses min(epoch / warmup, 1), so the factor is 1/warmup in
the first epoch and 1 from epoch `warmup` on. `self.epoch` is 0-based, hence min((epoch + 1) / warmup, 1).
CIFAR-100 defaults: alpha 1, beta 8 (2 or 6 for some pairs, see the configs), T 4, warm-up 20 epochs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.losses import dkd_terms, warmup_factor
from distillab.methods.base import Method, MethodOptions, register


class DKDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    renamed: ClassVar[dict[str, str]] = {"alpha": "tckd_weight", "beta": "nckd_weight"}
    tckd_weight: float = Field(1.0, ge=0, description="TCKD weight (the paper's alpha)")
    nckd_weight: float = Field(8.0, ge=0, description="NCKD weight (the paper's beta; CIFAR-100: 8, or 2/6 for some "
                               "pairs)")
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
        ramp = warmup_factor(self.epoch_tensor, o.warmup)
        return logits, {
            "ce": o.ce_weight * F.cross_entropy(logits, labels),
            "tckd": ramp * o.tckd_weight * tckd,
            "nckd": ramp * o.nckd_weight * nckd,
        }
