"""MobileNetV2 for CIFAR (`mobile_half`: expansion 6, width 0.5), as in the CRD zoo.

Stem: 3x3 conv stride 2 (32 -> 16 px). The seven inverted-residual groups are merged into four
stages so that stage outputs are 12x16x16, 16x8x8, 48x4x4 and 160x2x2. The 1x1 conv to 1280
channels (+BN-ReLU) is `head.pre`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from distillab.models.blocks import conv_bn, init_conv_fan_out, init_linear_small
from distillab.models.registry import register
from distillab.models.staged import ClassifierHead, StagedNet

# (channels at width 1, blocks, first stride) per group; group 0 has expansion 1, the others `expansion`.
_GROUPS = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
# Groups merged into each stage.
_STAGES = [(0, 1), (2,), (3, 4), (5, 6)]


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear); identity skip when shapes match."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.use_residual = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return x + out if self.use_residual else out


class MobileNetV2(StagedNet):
    """MobileNetV2 with expansion `expansion` (the first group keeps 1) and width multiplier `width`."""

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        expansion: int = 6,
        width: float = 0.5,
    ) -> None:
        super().__init__(in_channels)
        channels = int(32 * width)
        self.stem = conv_bn(in_channels, channels, 3, stride=2)
        groups = []
        for index, (c, n, s) in enumerate(_GROUPS):
            out = int(c * width)
            blocks = []
            for j in range(n):
                t = 1 if index == 0 else expansion
                blocks.append(InvertedResidual(channels, out, s if j == 0 else 1, t))
                channels = out
            groups.append(blocks)
        self.stages = nn.ModuleList(
            nn.Sequential(*[b for g in merged for b in groups[g]]) for merged in _STAGES
        )
        last = int(1280 * width) if width > 1.0 else 1280
        self.head = ClassifierHead(last, num_classes, pre=conv_bn(channels, last, 1))
        self.declare_stages([int(_GROUPS[merged[-1]][0] * width) for merged in _STAGES],
                            [math.prod(_GROUPS[g][2] for g in merged) for merged in _STAGES], stem_stride=2)
        init_conv_fan_out(self)
        init_linear_small(self)


register("mobile_half")(partial(MobileNetV2, expansion=6, width=0.5))
register("MobileNetV2")(partial(MobileNetV2, expansion=6, width=0.5))
