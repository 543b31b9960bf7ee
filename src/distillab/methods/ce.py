"""`ce`: the student trained alone with cross-entropy (also how teachers are trained)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.methods.base import Method, MethodOptions, register


class CEOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@register("ce")
class CrossEntropy(Method):
    Options = CEOptions
    requires_teacher = False

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, None, **options)  # a teacher, if given, is not needed

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.opts.label_smoothing)
        return logits, {"ce": self.opts.ce_weight * ce}
