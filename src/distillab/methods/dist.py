"""`dist`: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

With y = softmax(z / tau) and rho the Pearson correlation (cosine of the mean-centred vectors, eps 1e-8):
inter = 1 - mean over samples of rho(y_s[b, :], y_t[b, :]) (across classes),
intra = 1 - mean over classes of rho(y_s[:, c], y_t[:, c]) (across the batch),
L_DIST = tau^2 * (beta * inter + gamma * intra); L = ce_weight * CE + dist_weight * L_DIST.
CIFAR-100 (DIST code): tau 4, beta = gamma = 1, dist_weight 2, CE 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.losses import dist_terms
from distillab.methods.base import Method, MethodOptions, register


class DISTOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    dist_weight: float = Field(2.0, ge=0)
    renamed: ClassVar[dict[str, str]] = {"beta": "inter_weight", "gamma": "intra_weight", "tau": "temperature"}
    inter_weight: float = Field(1.0, ge=0, description="inter-class relation weight (the paper's beta), times "
                                "dist_weight")
    intra_weight: float = Field(1.0, ge=0, description="intra-class relation weight (the paper's gamma), times "
                                "dist_weight")
    temperature: float = Field(4.0, gt=0, description="softmax temperature (the paper's tau; CIFAR 4, ImageNet 1)")


@register("dist")
class DIST(Method):
    Options = DISTOptions
    caches_teacher = True

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        o = self.opts
        inter, intra = dist_terms(logits, teacher_logits, o.temperature)
        return logits, {
            "ce": o.ce_weight * F.cross_entropy(logits, labels),
            "inter": o.dist_weight * o.inter_weight * inter,
            "intra": o.dist_weight * o.intra_weight * intra,
        }
