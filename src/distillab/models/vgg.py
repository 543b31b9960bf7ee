"""VGG with BatchNorm for 32x32 inputs (vgg8 ... vgg19), as in the CRD zoo: five conv blocks, no FC stack.

Block 0 is the stem; blocks 1-4 are the stages. The 2x2 max-pools after blocks 0-2 sit at the start
of the following stage (inside its first layer), so every layer of a stage outputs the same shape.
The pools use `ceil_mode`, which changes nothing for even sizes (32 -> 16 -> 8 -> 4) and gives
28 -> 14 -> 7 -> 4 instead of dropping a row at 7 px.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from distillab.models.blocks import init_conv_fan_out, init_linear_small
from distillab.models.registry import register
from distillab.models.staged import ClassifierHead, StagedNet


class VGGLayer(nn.Module):
    """Optional 2x2 max-pool, then 3x3 conv (with bias), BN and `relu`."""

    ends_with_relu = True
    preact_bn = "bn"

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True) if pool else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(self.pool(x))))


class VGG(StagedNet):
    """`cfg` lists the conv widths of the five blocks; pools follow blocks 0, 1 and 2 (32-px setting)."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        if len(cfg) != 5:
            raise ValueError(f"VGG needs 5 blocks of widths, got {len(cfg)}")
        blocks = []
        channels = in_channels
        for index, widths in enumerate(cfg):
            layers = []
            for j, width in enumerate(widths):
                layers.append(VGGLayer(channels, width, pool=(j == 0 and index in (1, 2, 3))))
                channels = width
            blocks.append(nn.Sequential(*layers))
        self.stem = blocks[0]
        self.stages = nn.ModuleList(blocks[1:])
        self.head = ClassifierHead(channels, num_classes)
        self.declare_stages([widths[-1] for widths in cfg[1:]], (2, 2, 2, 1))
        init_conv_fan_out(self)
        init_linear_small(self)


_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}

for _name, _cfg in _CFGS.items():
    register(_name)(partial(VGG, _cfg))
