"""Base of the methods that compare one student layer with one teacher layer: L = ce_weight * CE + terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillab.methods.base import Method
from distillab.roles import FeatureInfo, roles


class LayerPairMethod(Method):
    """Taps `student_layer` and `teacher_layer` (options; default: the feature `layer_role` picks from each
    model's roles) and adds the subclass's `feature_terms(f_s, f_t)` to the weighted cross-entropy. Options need
    `ce_weight`, `student_layer` and `teacher_layer`."""

    caches_teacher = True

    @staticmethod
    def layer_role(info: FeatureInfo) -> str:
        """The tap name of the default feature, from a model's roles."""
        raise NotImplementedError

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        s_name = self.opts.student_layer or self.layer_role(roles(student, "student_layer"))
        t_name = self.opts.teacher_layer or self.layer_role(roles(teacher, "teacher_layer"))
        self.student_tap = self.tap(student, [s_name])
        self.teacher_tap = self.tap(teacher, [t_name])

    def feature_terms(self, f_s: torch.Tensor, f_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's weighted loss terms on the student and teacher features."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        self.teacher_forward(images)
        (f_s,), (f_t,) = self.student_tap.take(), self.teacher_tap.take()
        return logits, {"ce": self.opts.ce_weight * F.cross_entropy(logits, labels), **self.feature_terms(f_s, f_t)}
