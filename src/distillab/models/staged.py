"""The StagedNet interface every zoo model implements: stem, stages, head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distillab.roles import FeatureInfo, StageInfo


class ClassifierHead(nn.Module):
    """`pre` (optional conv/BN-ReLU on the last map), global average pool, flatten, `fc`.

    Tapping `head.pre` gives the pre-pool feature map; `head.pool` the pooled vector; `head.fc` the logits.
    """

    def __init__(self, in_features: int, num_classes: int, pre: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.pre(h)))


class StagedNet(nn.Module):
    """A classifier seen as `head(stages[n-1](...stages[0](stem(x))))`.

    Each stage is an `nn.Sequential` of blocks, so block outputs can be tapped as `stages.i.j`.
    `forward_from(i, h)` runs stages i.. and the head on `h`, the input of stage i (the stem
    output for i = 0); `forward_from(len(stages), h)` runs the head alone.
    """

    stem: nn.Module
    stages: nn.ModuleList
    head: ClassifierHead

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self._in_channels = in_channels
        self._stage_channels: tuple[int, ...] = ()
        self._stage_strides: tuple[int, ...] = ()
        self._stem_stride = 1

    def declare_stages(self, channels: Sequence[int], strides: Sequence[int], stem_stride: int = 1) -> None:
        """Every family's constructor states its stages' output channels and strides (for `feature_info`)."""
        self._stage_channels, self._stage_strides, self._stem_stride = tuple(channels), tuple(strides), stem_stride

    @property
    def feature_info(self) -> FeatureInfo:
        """The feature roles, from the declared widths and strides and the module layout (no forward pass).
        A block ends in a ReLU of its full output when its class sets `ends_with_relu`."""
        if len(self._stage_channels) != len(self.stages) or len(self._stage_strides) != len(self.stages):
            raise TypeError(f"{type(self).__name__} must call declare_stages() with one entry per stage")
        stages, reduction = [], self._stem_stride
        for i, (stage, channels, stride) in enumerate(zip(self.stages, self._stage_channels, self._stage_strides,
                                                          strict=True)):
            reduction *= stride
            blocks = tuple(f"stages.{i}.{j}" for j in range(len(stage)))
            preacts = tuple(f"{name}.relu:input" if getattr(block, "ends_with_relu", False) else None
                            for name, block in zip(blocks, stage, strict=True))
            points = self.block_next_preacts(i)
            stages.append(StageInfo(f"stages.{i}", channels, reduction, blocks, preacts, preacts[-1],
                                    self.next_preact(i, preacts[-1]), tuple(p for p, _ in points),
                                    tuple(bn for _, bn in points)))
        pre = self.head.pre
        pre_convs = [n for n, m in pre.named_modules() if isinstance(m, nn.Conv2d)]
        pre_relu = isinstance(getattr(pre, "relu", None), nn.ReLU)
        return FeatureInfo(
            stages=tuple(stages), prepool="head.pre",
            prepool_preact="head.pre.relu:input" if pre_convs and pre_relu else stages[-1].preact,
            pooled="head.pool", channels=self.head.fc.in_features,
            last_conv=f"head.pre.{pre_convs[-1]}" if pre_convs else self._last_block_conv(stages[-1].blocks[-1]),
            classifier="head.fc")

    def next_preact(self, stage_index: int, preact: str | None) -> str | None:
        """The pre-activation the next layer computes from stage `stage_index`'s output (see StageInfo): its own
        `preact` for post-activation blocks; pre-activation families override it."""
        return preact

    def block_next_preacts(self, stage_index: int) -> tuple[tuple[str | None, str | None], ...]:
        """Per block of stage `stage_index`: its output as the next layer takes it before a ReLU, and the BN that
        models that map (see StageInfo). Post-activation blocks: their own pre-activation and the BN their class
        names in `preact_bn`; pre-activation families override it."""
        points = []
        for j, block in enumerate(self.stages[stage_index]):
            name, bn = f"stages.{stage_index}.{j}", getattr(block, "preact_bn", None)
            ends = getattr(block, "ends_with_relu", False)
            points.append((f"{name}.relu:input" if ends else None, f"{name}.{bn}" if ends and bn else None))
        return tuple(points)

    def _last_block_conv(self, block: str) -> str | None:
        convs = [n for n, m in self.get_submodule(block).named_children() if isinstance(m, nn.Conv2d)
                 and n != "shortcut"]
        return f"{block}.{convs[-1]}" if convs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, self.stem(x))

    def forward_from(self, stage_index: int, h: torch.Tensor) -> torch.Tensor:
        if not 0 <= stage_index <= len(self.stages):
            raise IndexError(f"stage_index must be in [0, {len(self.stages)}], got {stage_index}")
        for stage in self.stages[stage_index:]:
            h = stage(h)
        return self.head(h)

    @property
    def stage_channels(self) -> list[int]:
        """Output channels of each stage, as declared."""
        return list(self._stage_channels)

    def stage_shapes(self, input_size: tuple[int, int, int] | None = None) -> list[tuple[int, int, int]]:
        """(C, H, W) of every stage output for one input of `input_size` (default: the model's own)."""
        size = input_size or self.input_size
        was_training = self.training
        self.eval()
        shapes = []
        try:
            param = next(self.parameters())
            with torch.no_grad():
                h = self.stem(torch.zeros(1, *size, dtype=param.dtype, device=param.device))
                for stage in self.stages:
                    h = stage(h)
                    shapes.append(tuple(h.shape[1:]))
        finally:
            self.train(was_training)
        return shapes

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The input the model was designed for: (in_channels, 32, 32)."""
        return (self.in_channels, 32, 32)

    @property
    def in_channels(self) -> int:
        return self._in_channels
