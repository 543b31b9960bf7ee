"""ShuffleNet v1 (groups 3) and v2 (net size 1) for CIFAR, as in the CRD zoo.

Both use a 1x1 stem conv to 24 channels at stride 1, so stage outputs are 16, 8 and 4 px for a
32-px input. Weights keep PyTorch's default initialisation, as the reference zoo does.
"""

from __future__ import annotations

import torch
from torch import nn

from distillab.models.blocks import ChannelShuffle, conv_bn
from distillab.models.registry import register
from distillab.models.staged import ClassifierHead, StagedNet


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1-BN-ReLU, channel shuffle, 3x3 depthwise-BN-ReLU, grouped 1x1-BN, then merge and `relu`.

    At stride 2 the shortcut is a 3x3 average pool and is concatenated (so the unit adds
    `out_planes` new channels to its input); at stride 1 it is the identity and is added.
    """

    ends_with_relu = True

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = self.shortcut(x)
        return self.relu(torch.cat([out, skip], 1) if self.stride == 2 else out + skip)


class ShuffleNetV1(StagedNet):
    """Three stages of ShuffleV1 units; the first unit of each stage has stride 2."""

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__(in_channels)
        stem_planes = 24
        self.stem = conv_bn(in_channels, stem_planes, 1)
        stages = []
        planes_in = stem_planes
        for planes, n in zip(out_planes, num_blocks, strict=True):
            units = []
            for j in range(n):
                first_groups = 1 if planes_in == stem_planes else groups
                new_planes = planes - planes_in if j == 0 else planes
                units.append(ShuffleV1Unit(planes_in, new_planes, 2 if j == 0 else 1, groups, first_groups))
                planes_in = planes
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(out_planes[-1], num_classes)
        self.declare_stages(out_planes, (2, 2, 2))


class ShuffleV2Unit(nn.Module):
    """Split channels in half; the right half goes 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN, `relu`;
    concatenate with the untouched left half and shuffle (groups 2)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        half = planes // 2
        self.split = half
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x[:, : self.split], x[:, self.split :]
        right = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(right)))))
        right = self.relu(self.bn3(self.conv3(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: left 3x3 depthwise-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU;
    concatenate and shuffle (groups 2)."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        mid = out_planes // 2
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, 2, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(StagedNet):
    """Three stages, each a stride-2 down unit then `num_blocks` basic units; `head.pre` is the
    final 1x1 conv to `out_planes[3]` channels + BN-ReLU."""

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        out_planes: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__(in_channels)
        stem_planes = 24
        self.stem = conv_bn(in_channels, stem_planes, 1)
        stages = []
        planes_in = stem_planes
        for planes, n in zip(out_planes[:3], num_blocks, strict=True):
            units = [ShuffleV2Down(planes_in, planes)] + [ShuffleV2Unit(planes) for _ in range(n)]
            stages.append(nn.Sequential(*units))
            planes_in = planes
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(out_planes[3], num_classes, pre=conv_bn(planes_in, out_planes[3], 1))
        self.declare_stages(out_planes[:3], (2, 2, 2))


register("ShuffleV1")(ShuffleNetV1)
register("ShuffleV2")(ShuffleNetV2)
