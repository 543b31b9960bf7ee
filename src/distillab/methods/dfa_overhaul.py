"""Overhaul's feature distance (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019) for
`dfa`'s stage 2 (`distance: overhaul`): maps taken before their ReLU, the teacher's margin-ReLU max(t, m) with a
per-channel margin m = E[x | x < 0] read from a BatchNorm, a partial L2 that ignores a student already below a
non-positive target, and per-stage weights 2^(i - G + 1) (the last stage 1, each earlier one half the next).

Each piece is a plain function of tensors, tested against a hand computation (tests/test_dfa_overhaul.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distillab.errors import ConfigError
from distillab.roles import roles

# where P(x < 0) is at most this, the margin is -3 sigma instead of the conditional mean (Overhaul's code)
RARELY_NEGATIVE = 1e-3


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per channel E[x | x < 0] for x ~ N(mean, std^2): mean - std * phi(mean/std) / Phi(-mean/std), or -3 std
    where P(x < 0) = Phi(-mean/std) <= 1e-3. Computed in float64, returned as float32."""
    mean, std = mean.double(), std.double().abs()
    z = mean / std
    p_negative = torch.special.ndtr(-z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    conditional = mean - std * density / p_negative
    return torch.where(p_negative > RARELY_NEGATIVE, conditional, -3 * std).float()


def bn_margin(bn: nn.Module, where: str) -> torch.Tensor:
    """The margin of a BatchNorm's output, taken to be N(bias, weight^2) per channel (its input normalised): the
    BN's affine parameters, as Overhaul reads its teacher's margins, not its running statistics."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None or bn.bias is None:
        raise ConfigError(f"method.options.distance overhaul reads the margin of {where} from an affine BatchNorm; "
                          f"the roles name a {type(bn).__name__} there: use distance mse")
    with torch.no_grad():
        return gaussian_margin(bn.bias.detach().cpu(), bn.weight.detach().cpu())


def margin_relu(x: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """max(x, m) with a margin per channel (dim 1 of x)."""
    return torch.maximum(x, margin.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2))))


def partial_l2(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum over every value of (student - target)^2, except where student <= target <= 0 (a student already at
    or below a non-positive target: past the teacher's ReLU both give 0)."""
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum()


def stage_weights(groups: int) -> list[float]:
    """Overhaul's weight of each of `groups` stages, shallow to deep: 1 / 2^(groups - 1 - i)."""
    return [2.0 ** (i - groups + 1) for i in range(groups)]


def preact_candidates(teacher: nn.Module, blocks: list[list[str]], channels: list[int]
                      ) -> tuple[list[list[str]], list[torch.Tensor]]:
    """For the named teacher blocks of each group: the tap names of their outputs as the next layer takes them
    before a ReLU, and the group's margins (blocks x channels) from the BatchNorms that model those maps, all from
    the teacher's roles; a ConfigError where a block has none declared."""
    info = roles(teacher)
    declared = {b: (p, bn) for s in info.stages
                for b, p, bn in zip(s.blocks, s.block_next_preacts, s.block_next_preact_bns, strict=False)}
    missing = [b for group in blocks for b in group if None in declared.get(b, (None, None))]
    if missing:
        raise ConfigError(f"method.options.distance overhaul distils each teacher block's output before its ReLU, "
                          f"with a margin from the BatchNorm that makes it; {type(teacher).__name__} declares no such "
                          f"point for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (the roles' "
                          "block_next_preacts and block_next_preact_bns): use distance mse")
    names = [[declared[b][0] for b in group] for group in blocks]
    margins = []
    for group, width in zip(blocks, channels, strict=True):
        group_margins = [bn_margin(teacher.get_submodule(declared[b][1]), declared[b][1]) for b in group]
        if any(m.numel() != width for m in group_margins):
            raise ConfigError(f"method.options.distance overhaul: the BatchNorms {[declared[b][1] for b in group]} "
                              f"do not all have their maps' {width} channels: use distance mse")
        margins.append(torch.stack(group_margins))
    return names, margins
