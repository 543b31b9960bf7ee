"""`at`: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017), benchmark form.

at(F) = L2-normalised, flattened channel mean of F^p (p = 2). Per pair of maps the loss is the mean over
batch and pixels of (at(F_s) - at(F_t))^2, the larger map first adaptive-average-pooled to the smaller.
L = ce_weight * CE + at_weight * sum over pairs; by default every stage output of each network, paired in
order (the shorter list wins). CIFAR-100: p 2, at_weight 1000, CE 1 (RepDistiller, mdistiller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.losses import at_loss
from distillab.methods.base import Method, MethodOptions, register
from distillab.roles import roles


class ATOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    at_weight: float = Field(1000.0, ge=0)
    p: float = Field(2.0, gt=0)
    student_layers: list[str] | None = Field(None, description="tap names; default: every stage output")
    teacher_layers: list[str] | None = Field(None, description="tap names; default: every stage output")


@register("at")
class AT(Method):
    Options = ATOptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        s_names = self.opts.student_layers or roles(student, "student_layers").stage_names
        t_names = self.opts.teacher_layers or roles(teacher, "teacher_layers").stage_names
        pairs = min(len(s_names), len(t_names))
        self.student_tap = self.tap(student, s_names[:pairs])
        self.teacher_tap = self.tap(teacher, t_names[:pairs])

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        self.teacher_forward(images)
        pairs = zip(self.student_tap.take(), self.teacher_tap.take(), strict=True)
        attention = sum(at_loss(f_s, f_t, self.opts.p) for f_s, f_t in pairs)
        return logits, {
            "ce": self.opts.ce_weight * F.cross_entropy(logits, labels),
            "at": self.opts.at_weight * attention,
        }
