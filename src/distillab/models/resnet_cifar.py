"""CIFAR ResNets of depth 6n+2 (resnet8 ... resnet110, resnet8x4, resnet32x4), as in the CRD zoo."""

from __future__ import annotations

from functools import partial

from torch import nn

from distillab.models.blocks import BasicBlock, conv_bn, init_conv_fan_out
from distillab.models.registry import register
from distillab.models.staged import ClassifierHead, StagedNet


class CifarResNet(StagedNet):
    """3x3 stem (stride 1), three stages of n BasicBlocks (strides 1, 2, 2), global pool, fc.

    `widths` = (stem, stage 1, stage 2, stage 3) channels; `depth` = 6n + 2; `width` scales every one of them
    (rounded, at least 1 channel): 0.5 gives a half-width network, a student of less capacity than its zoo name.
    """

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__(in_channels)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if not 0 < width <= 16:
            raise ValueError(f"CIFAR ResNet width must be in (0, 16], got {width}")
        widths = tuple(max(1, round(w * width)) for w in widths)
        n = (depth - 2) // 6
        self.stem = conv_bn(in_channels, widths[0], 3)
        stages = []
        planes_in = widths[0]
        for index, planes in enumerate(widths[1:]):
            first_stride = 1 if index == 0 else 2
            blocks = [
                BasicBlock(planes_in if j == 0 else planes, planes, first_stride if j == 0 else 1)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            planes_in = planes
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(widths[-1], num_classes)
        self.declare_stages(widths[1:], (1, 2, 2))
        init_conv_fan_out(self)


_SLIM = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)
_CONFIGS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, _SLIM),
    "resnet14": (14, _SLIM),
    "resnet20": (20, _SLIM),
    "resnet32": (32, _SLIM),
    "resnet44": (44, _SLIM),
    "resnet56": (56, _SLIM),
    "resnet110": (110, _SLIM),
    "resnet8x4": (8, _WIDE),
    "resnet32x4": (32, _WIDE),
}

for _name, (_depth, _widths) in _CONFIGS.items():
    register(_name)(partial(CifarResNet, _depth, _widths))
