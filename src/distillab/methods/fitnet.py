"""`fitnet`: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), benchmark form.

One stage of training: L = ce_weight * CE + hint_weight * MSE(ConvReg(F_s), F_t), on the output of the
second stage of each network by default (RepDistiller's hint layer 2: 128x16x16 for resnet8x4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillab.errors import ConfigError
from distillab.methods.base import Method, MethodOptions, register
from distillab.roles import roles


class ConvReg(nn.Sequential):
    """Maps a student map (Cs, Hs, Ws) to the teacher's (Ct, Ht, Wt): a conv chosen by the spatial sizes,
    then BN(Ct) and ReLU (`relu=False` leaves the ReLU out)."""

    def __init__(self, student_shape: tuple, teacher_shape: tuple, relu: bool = True) -> None:
        (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
        if hs == 2 * ht:
            conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif 2 * hs == ht:
            conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            raise ConfigError(f"cannot regress a {hs}x{ws} student map onto a {ht}x{wt} teacher map")
        super().__init__(conv, nn.BatchNorm2d(ct), *([nn.ReLU()] if relu else []))


class FitNetOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    hint_weight: float = Field(100.0, ge=0)
    student_layer: str | None = Field(None, description="tap name; default: output of the student's stage 2")
    teacher_layer: str | None = Field(None, description="tap name; default: output of the teacher's stage 2")


@register("fitnet")
class FitNet(Method):
    Options = FitNetOptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        s_name = self.opts.student_layer or roles(student, "student_layer").stage(1).name
        t_name = self.opts.teacher_layer or roles(teacher, "teacher_layer").stage(1).name
        s_shape = self.shapes(student, [s_name])[s_name]
        t_shape = self.shapes(teacher, [t_name])[t_name]
        self.regressor = ConvReg(s_shape, t_shape)
        self.student_tap = self.tap(student, [s_name])
        self.teacher_tap = self.tap(teacher, [t_name])

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        self.teacher_forward(images)
        (f_s,), (f_t,) = self.student_tap.take(), self.teacher_tap.take()
        hint = F.mse_loss(self.regressor(f_s).float(), f_t.float())
        return logits, {
            "ce": self.opts.ce_weight * F.cross_entropy(logits, labels),
            "hint": self.opts.hint_weight * hint,
        }
