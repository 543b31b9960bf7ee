"""`kd`: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

L = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)), the KL averaged over
the batch. CIFAR-100 standard: T = 4, CE 0.1, KD 0.9 (RepDistiller, mdistiller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.losses import kd_loss
from distillab.methods.base import Method, MethodOptions, register


class KDOptions(MethodOptions):
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.1, ge=0)
    kd_weight: float = Field(0.9, ge=0)


@register("kd")
class KD(Method):
    Options = KDOptions
    caches_teacher = True

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        return logits, {
            "ce": self.opts.ce_weight * F.cross_entropy(logits, labels),
            "kd": self.opts.kd_weight * kd_loss(logits, teacher_logits, self.opts.temperature),
        }
