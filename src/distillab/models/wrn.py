"""Pre-activation Wide ResNets WRN-d-k (wrn_16_1 ... wrn_40_2, wrn_28_4), as in the CRD zoo."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from distillab.models.blocks import init_conv_fan_out
from distillab.models.registry import register
from distillab.models.staged import ClassifierHead, StagedNet


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut; the output is the raw sum.

    When the shape changes, the shortcut is a 1x1 conv applied to the *activated* input
    (`relu1(bn1(x))`); otherwise it is `x` itself. The last conv (`conv2`) has no BN after it.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(StagedNet):
    """3x3 stem conv (16 ch), three stages of n pre-activation blocks (16k, 32k, 64k ch; strides 1, 2, 2).

    `depth` = 6n + 4. The final BN-ReLU lives in `head.pre`, so stage outputs are raw block sums.
    """

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int = 100,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages = []
        planes_in = 16
        for index, planes in enumerate(widths):
            first_stride = 1 if index == 0 else 2
            blocks = [
                PreActBlock(planes_in if j == 0 else planes, planes, first_stride if j == 0 else 1, dropout)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            planes_in = planes
        self.stages = nn.ModuleList(stages)
        pre = nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(widths[-1]), relu=nn.ReLU()))
        self.head = ClassifierHead(widths[-1], num_classes, pre=pre)
        self.declare_stages(widths, (1, 2, 2))
        init_conv_fan_out(self)
        nn.init.zeros_(self.head.fc.bias)

    def next_preact(self, stage_index: int, preact: str | None) -> str | None:
        """The stage output as the next pre-activation block sees it before its ReLU: the next block's `bn1`
        output, or `head.pre`'s BN output after the last stage (RepDistiller's `preact` features of a WRN)."""
        if stage_index + 1 < len(self.stages):
            return f"stages.{stage_index + 1}.0.relu1:input"
        return "head.pre.relu:input"

    def block_next_preacts(self, stage_index: int) -> tuple[tuple[str | None, str | None], ...]:
        """Each block's output as the next BN normalises it, before that BN's ReLU: the next block's `bn1`, after a
        stage's last block the next stage's first `bn1`, after the last stage `head.pre.bn` (Overhaul's
        `get_bn_before_relu` for its stage outputs)."""
        following = [f"stages.{stage_index}.{j}" for j in range(1, len(self.stages[stage_index]))]
        if stage_index + 1 < len(self.stages):
            following.append(f"stages.{stage_index + 1}.0")
        points = [(f"{block}.relu1:input", f"{block}.bn1") for block in following]
        if stage_index + 1 == len(self.stages):
            points.append(("head.pre.relu:input", "head.pre.bn"))
        return tuple(points)


for _depth, _widen in [(16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (40, 1), (40, 2)]:
    register(f"wrn_{_depth}_{_widen}")(partial(WideResNet, _depth, _widen))
