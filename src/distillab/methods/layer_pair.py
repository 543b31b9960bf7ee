"""Base of the methods that compare one student layer with one teacher layer: L = ce_weight * CE + terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillab.methods.base import Method


class LayerPairMethod(Method):
    """Taps `student_layer` and `teacher_layer` (options; default `default_layer(model, option)`) and adds the
    subclass's `feature_terms(f_s, f_t)` to the weighted cross-entropy. Options need `ce_weight`,
    `student_layer` and `teacher_layer`."""

    caches_teacher = True

    @staticmethod
    def default_layer(model: nn.Module, option: str) -> str:
        raise NotImplementedError

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        self.student_tap = self.tap(student, [self.opts.student_layer or self.default_layer(student, "student_layer")])
        self.teacher_tap = self.tap(teacher, [self.opts.teacher_layer or self.default_layer(teacher, "teacher_layer")])

    def feature_terms(self, f_s: torch.Tensor, f_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's weighted loss terms on the student and teacher features."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        self.teacher_forward(images)
        (f_s,), (f_t,) = self.student_tap.take(), self.teacher_tap.take()
        return logits, {"ce": self.opts.ce_weight * F.cross_entropy(logits, labels), **self.feature_terms(f_s, f_t)}
