"""`vid`: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019),
RepDistiller form.

For each pair of stage outputs, a regressor (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv; no biases, the
hidden width the teacher's channel count) predicts the mean of a Gaussian over the teacher map, with a
learnt per-channel variance softplus(log_scale) + eps, initialised to init_variance. The loss is the
mean over all entries of 0.5 * ((mu - t)^2 / var + log var), after pooling the larger map to the smaller
size; summed over pairs (every stage output, paired in order). CIFAR-100: vid_weight 1, CE 1, init 5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillab.methods.base import Method, MethodOptions, register
from distillab.roles import roles


class VIDRegressor(nn.Module):
    """Gaussian q(t | s): mean from a three-layer 1x1 conv net, per-channel variance."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_variance: float,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        self.eps = eps
        inverse_softplus = math.log(math.expm1(init_variance - eps))
        self.log_scale = nn.Parameter(torch.full((out_channels,), inverse_softplus))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood (without the constant) of the teacher map."""
        if f_s.shape[-2:] != f_t.shape[-2:]:
            size = min(f_s.shape[-2:], f_t.shape[-2:], key=lambda hw: hw[0] * hw[1])
            f_s, f_t = F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((self.mean(f_s) - f_t.float()).pow(2) / var + torch.log(var))).mean()


class VIDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    vid_weight: float = Field(1.0, ge=0)
    init_variance: float = Field(5.0, gt=0)
    student_layers: list[str] | None = Field(None, description="tap names; default: every stage output")
    teacher_layers: list[str] | None = Field(None, description="tap names; default: every stage output")


@register("vid")
class VID(Method):
    Options = VIDOptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        s_names = self.opts.student_layers or roles(student, "student_layers").stage_names
        t_names = self.opts.teacher_layers or roles(teacher, "teacher_layers").stage_names
        pairs = min(len(s_names), len(t_names))
        s_names, t_names = s_names[:pairs], t_names[:pairs]
        s_channels = [s[0] for s in self.shapes(student, s_names).values()]
        t_channels = [s[0] for s in self.shapes(teacher, t_names).values()]
        self.regressors = nn.ModuleList(VIDRegressor(cs, ct, ct, self.opts.init_variance)
                                        for cs, ct in zip(s_channels, t_channels, strict=True))
        self.student_tap = self.tap(student, s_names)
        self.teacher_tap = self.tap(teacher, t_names)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        self.teacher_forward(images)
        pairs = zip(self.regressors, self.student_tap.take(), self.teacher_tap.take(), strict=True)
        vid = sum(regressor(f_s, f_t) for regressor, f_s, f_t in pairs)
        return logits, {
            "ce": self.opts.ce_weight * F.cross_entropy(logits, labels),
            "vid": self.opts.vid_weight * vid,
        }
