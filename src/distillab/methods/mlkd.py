"""`mlkd`: Jin, Wang, Lin, "Multi-Level Logit Distillation" (CVPR 2023), as its reference code computes it.

Two views of each batch (weak: crop + flip; strong: its own crop + flip, RandAugment and Cutout, made on the device
by the loader), student and teacher on both, and logit distillation at three levels, each summed over the
temperatures T in {4, 3, 5, 2, 6}:
- instance: T^2 KL(p_t || p_s) per view (kd_loss);
- class: ||G_t - G_s||^2 / C with G = P^T P, the C x C Gram matrix of the batch's softmax outputs P (B x C);
- batch: ||G_t - G_s||^2 / B with G = P P^T, the B x B Gram matrix.

L = ce * (CE_weak + CE_strong) + kd * (kd_weak + kd_strong) + cc * cc_weak + bc * bc_weak, where
- kd_weak, cc_weak and bc_weak are the weak view's sums times the fraction of the batch's samples (kd, bc) or
  classes (cc) whose teacher confidence (max softmax; for classes, the batch sum of softmax) is at most its
  median: the reference multiplies an already batch-averaged loss by that mask and averages, which scales it;
- kd_strong is the strong view's instance sum, except that with `quirk` (the reference's behaviour, default)
  its T = 2 and T = 6 terms use the weak view's logits;
- the strong view's class and batch terms are computed by the reference but left out of its total: so here.
Student logits on the weak view are what the Trainer scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.losses import mlkd_terms
from distillab.methods.base import Method, MethodOptions, register
from distillab.methods.capabilities import StrongView, missing_input


class MLKDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0, description="weight of CE on each view")
    kd_weight: float = Field(1.0, ge=0)
    cc_weight: float = Field(1.0, ge=0)
    bc_weight: float = Field(1.0, ge=0)
    quirk: bool = Field(True, description="the reference's strong-view sum takes T = 2 and 6 from the weak view")


@register("mlkd")
class MLKD(StrongView, Method):
    Options = MLKDOptions

    def forward(self, images: torch.Tensor, labels: torch.Tensor, strong: torch.Tensor | None = None):
        if strong is None:
            raise missing_input(self.name, "a strongly augmented view of each batch", "method(images, labels, strong)",
                                "distillab.data.DeviceLoader(..., strong_view=True) makes it")
        o = self.opts
        logits, logits_strong = self.student(images), self.student(strong)  # apart: BN sees one view at a time
        with torch.no_grad():
            teacher_logits, teacher_strong = self.teacher(torch.cat([images, strong])).split(len(images))
        terms = mlkd_terms(logits, teacher_logits, logits_strong, teacher_strong, quirk=o.quirk)
        return logits, {
            "ce": o.ce_weight * (F.cross_entropy(logits, labels) + F.cross_entropy(logits_strong, labels)),
            "kd": o.kd_weight * terms["kd"],
            "cc": o.cc_weight * terms["cc"],
            "bc": o.bc_weight * terms["bc"],
        }
