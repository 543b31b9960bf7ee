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

from distillab.methods.base import Method, MethodOptions, register
from distillab.methods.kd import kd_loss

TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def class_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                           ) -> torch.Tensor:
    """||P_t^T P_t - P_s^T P_s||^2 / C, P = softmax(logits / T) (B x C)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / p_s.shape[1]


def batch_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                           ) -> torch.Tensor:
    """||P_t P_t^T - P_s P_s^T||^2 / B, P = softmax(logits / T) (B x C)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / p_s.shape[0]


def at_most_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of `values` at most their median (numpy's linear-interpolation percentile 50), on the device."""
    return (values <= torch.quantile(values.float(), 0.5)).float().mean()


def mlkd_terms(weak_s: torch.Tensor, weak_t: torch.Tensor, strong_s: torch.Tensor, strong_t: torch.Tensor,
               temperatures: tuple[float, ...] = TEMPERATURES, quirk: bool = True) -> dict[str, torch.Tensor]:
    """The unweighted kd (weak + strong), cc and bc terms of MLKD from the four logit tensors (B x C)."""
    p_t = F.softmax(weak_t.detach().float(), dim=1)
    sample_scale = at_most_median(p_t.max(dim=1).values)
    class_scale = at_most_median(p_t.sum(dim=0))
    kd_weak = sum(kd_loss(weak_s, weak_t, t) for t in temperatures)
    kd_strong = sum(kd_loss(weak_s, weak_t, t) if quirk and t in (2.0, 6.0) else kd_loss(strong_s, strong_t, t)
                    for t in temperatures)
    return {
        "kd": sample_scale * kd_weak + kd_strong,
        "cc": class_scale * sum(class_correlation_loss(weak_s, weak_t, t) for t in temperatures),
        "bc": sample_scale * sum(batch_correlation_loss(weak_s, weak_t, t) for t in temperatures),
    }


class MLKDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0, description="weight of CE on each view")
    kd_weight: float = Field(1.0, ge=0)
    cc_weight: float = Field(1.0, ge=0)
    bc_weight: float = Field(1.0, ge=0)
    quirk: bool = Field(True, description="the reference's strong-view sum takes T = 2 and 6 from the weak view")


@register("mlkd")
class MLKD(Method):
    Options = MLKDOptions
    extra_views = ("strong",)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, strong: torch.Tensor):
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
