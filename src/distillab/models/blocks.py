"""Building blocks and weight-init rules shared by the zoo families.

Every block ends with an `nn.ReLU` module named `relu` (never in-place), so tapping
`<block>.relu:input` yields the block's pre-activation output. No module works in place, so a
hook's tensor is never overwritten later in the forward pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    """`conv` (no bias, 'same' padding) then `bn`, then `relu` if asked; children are named."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        ),
        bn=nn.BatchNorm2d(out_channels),
    )
    if relu:
        layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Shortcut of a residual block: identity, or a 1x1 conv + BN when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, 1, stride, relu=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv3x3-BN-ReLU, conv3x3-BN, add shortcut, `relu`."""

    ends_with_relu = True
    preact_bn = "bn2"  # the BN before the sum that `relu` takes (the margin Overhaul reads for a ResNet)

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = projection(in_planes, planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand x4, add, `relu`."""

    ends_with_relu = True
    preact_bn = "bn3"

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = projection(in_planes, out_planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ChannelShuffle(nn.Module):
    """Interleave the channels of `groups` equal groups (ShuffleNet)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def init_conv_fan_out(model: nn.Module) -> None:
    """He-normal init of every conv from its fan-out, std sqrt(2 / (k*k*out)); conv biases to 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_linear_small(model: nn.Module, std: float = 0.01) -> None:
    """Every Linear layer: weights N(0, std), bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
