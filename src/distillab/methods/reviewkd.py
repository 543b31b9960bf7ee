"""`reviewkd`: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021), mdistiller form.

Levels: the student's stage outputs (post-ReLU) plus its pooled vector as a 1x1 map; the teacher's stage
outputs before their last ReLU plus its pooled vector. An attention-based fusion (ABF) chain runs from the
deepest level to the shallowest: each level maps its student feature to M = min(max_mid_channels, C of the
deepest student level) channels (1x1 conv + BN), fuses it with the upsampled result of the deeper level
through a 2-channel sigmoid gate (not on the deepest level), resizes to the teacher's size and predicts the
teacher's map (3x3 conv + BN). Every level's prediction is compared to the teacher by the hierarchical
context loss (HCL): MSE, plus the MSE of 4x4, 2x2, 1x1 average pools smaller than the map with weights
0.5, 0.25, 0.125, divided by the total weight; summed over levels.

L = ce_weight * CE + review_weight * min(epoch / warmup, 1) * HCL (epochs counted from 1, as in mdistiller;
see dkd.warmup_factor). CIFAR-100: review_weight 5, warm-up 20 epochs, CE 1. If the two networks have
different numbers of stages, levels are paired from the deepest one (the pooled vectors always pair).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillab.losses import hcl_loss, warmup_factor
from distillab.methods.base import Method, MethodOptions, register
from distillab.roles import FeatureInfo, roles


def gated_sum(gate: nn.Conv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """x * g0 + other * g1 with (g0, g1) = sigmoid(gate(cat[x, other])), for a 1x1 `gate` with 2 outputs.

    The 1x1 conv is applied to the two halves separately as channel contractions, so the concatenation is never
    built. On CPU, for resnet8x4's 512-channel 32x32 gate, forward and backward take half the time of mkldnn's
    2-output convolution on the concatenation (a whole ReviewKD step gains 1.5 %, a UniKD step 4 %).
    """
    weight = gate.weight.flatten(1).to(x.dtype)
    c = x.shape[1]
    logits = torch.einsum("oc,bchw->bohw", weight[:, :c], x) + torch.einsum("oc,bchw->bohw", weight[:, c:], other)
    if gate.bias is not None:
        logits = logits + gate.bias.to(x.dtype)[None, :, None, None]
    g = torch.sigmoid(logits)
    return x * g[:, :1] + other * g[:, 1:]


class ABF(nn.Module):
    """One attention-based fusion level: C_in -> M (1x1 conv, BN), optional gated fusion with the deeper
    level's M-channel map, resize to `out_size`, M -> C_out (3x3 conv, BN)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.predict = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        self.gate = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.predict[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None, out_size: tuple[int, int]):
        """(prediction of the teacher map, fused M-channel map passed to the next shallower level)."""
        x = self.reduce(x)
        if self.gate is not None:
            x = gated_sum(self.gate, x, F.interpolate(deeper, x.shape[-2:], mode="nearest"))
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.predict(x), x


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A pooled B x C vector as a B x C x 1 x 1 map (maps pass unchanged)."""
    return feature if feature.dim() == 4 else feature.reshape(*feature.shape[:2], 1, 1)


class ReviewKDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    review_weight: float = Field(5.0, ge=0, description="HCL weight (CIFAR config 5; mdistiller code default 1)")
    warmup: int = Field(20, ge=0, description="epochs of linear warm-up of the HCL term (0: none)")
    max_mid_channels: int = Field(512, gt=0)
    student_layers: list[str] | None = Field(None, description="tap names, shallow to deep; default: "
                                             "stage outputs and the pooled vector")
    teacher_layers: list[str] | None = Field(None, description="tap names, shallow to deep; default: pre-ReLU "
                                             "stage outputs and the pooled vector")


def review_levels(info: FeatureInfo, preact: bool) -> list[str]:
    """Every stage (the teacher's before their last ReLU, mdistiller's `preact_feats`) then the pooled vector."""
    return [*(info.stage_preacts if preact else info.stage_names), info.pooled]


@register("reviewkd")
class ReviewKD(Method):
    Options = ReviewKDOptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        s_names = self.opts.student_layers or review_levels(roles(student, "student_layers"), preact=False)
        t_names = self.opts.teacher_layers or review_levels(roles(teacher, "teacher_layers"), preact=True)
        levels = min(len(s_names), len(t_names))
        s_names, t_names = s_names[-levels:], t_names[-levels:]
        s_shapes = [_as_map_shape(s) for s in self.shapes(student, s_names).values()]
        t_shapes = [_as_map_shape(s) for s in self.shapes(teacher, t_names).values()]
        mid = min(self.opts.max_mid_channels, s_shapes[-1][0])
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < levels - 1)
                                  for i, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True)))
        self.out_sizes = [tuple(t[1:]) for t in t_shapes]
        self.student_tap = self.tap(student, s_names)
        self.teacher_tap = self.tap(teacher, t_names)

    def review(self, student_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF chain, deepest level first; predictions returned shallow to deep."""
        predictions, deeper = [], None
        for abf, feature, size in zip(self.abfs[::-1], student_features[::-1], self.out_sizes[::-1], strict=True):
            prediction, deeper = abf(as_map(feature), deeper, size)
            predictions.append(prediction)
        return predictions[::-1]

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        self.teacher_forward(images)
        predictions = self.review(self.student_tap.take())
        targets = [as_map(f) for f in self.teacher_tap.take()]
        ramp = warmup_factor(self.epoch_tensor, self.opts.warmup)
        return logits, {
            "ce": self.opts.ce_weight * F.cross_entropy(logits, labels),
            "hcl": self.opts.review_weight * ramp * hcl_loss(predictions, targets),
        }


def _as_map_shape(shape: tuple) -> tuple[int, int, int]:
    return tuple(shape) if len(shape) == 3 else (shape[0], 1, 1)
