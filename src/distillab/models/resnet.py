"""Four-stage ResNets adapted to CIFAR (ResNet18, ResNet34, ResNet50): 3x3 stem at stride 1, no max-pool."""

from __future__ import annotations

from functools import partial

from torch import nn

from distillab.models.blocks import BasicBlock, Bottleneck, conv_bn, init_conv_fan_out
from distillab.models.registry import register
from distillab.models.staged import ClassifierHead, StagedNet


class ResNet(StagedNet):
    """3x3 stem (64 ch), four stages of `block` with 64/128/256/512 planes (strides 1, 2, 2, 2), pool, fc.

    `zero_init_residual` zeroes the last BN of every residual branch, so each block starts as identity.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__(in_channels)
        self.stem = conv_bn(in_channels, 64, 3)
        stages = []
        planes_in = 64
        for index, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(planes_in, planes, first_stride if j == 0 else 1))
                planes_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(planes_in, num_classes)
        self.declare_stages([p * block.expansion for p in (64, 128, 256, 512)], (1, 2, 2, 2))
        init_conv_fan_out(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


register("ResNet18")(partial(ResNet, BasicBlock, (2, 2, 2, 2)))
register("ResNet34")(partial(ResNet, BasicBlock, (3, 4, 6, 3)))
register("ResNet50")(partial(ResNet, Bottleneck, (3, 4, 6, 3)))
