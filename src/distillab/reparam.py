"""Structural re-parameterization: fold BatchNorm into convolutions and merge parallel linear branches.

In eval mode a conv followed by BN is one affine map, so it folds into a single conv with a bias; a sum of
such branches (k×k conv + BN, smaller kernels zero-padded, identity + BN, or bare convs) folds into one
conv. `RepBranches` is such a multi-branch layer; `merge_branches` gives its single equivalent kernel and
bias, and `load_into_conv_bn` writes them into a plain conv + BN pair (as a deployed network has).
Merges are computed in float64 and cast back to the parameters' dtype.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

IDENTITY = "identity"
_KERNEL_KIND = re.compile(r"^(\d+)x\1$")


def fuse_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of `bn(conv(x))` in eval mode, for a conv of `weight` and optional `bias`.

    W' = W·γ/√(σ²+ε) and b' = β + (b − μ)·γ/√(σ²+ε) (b = 0 without a conv bias); float64.
    """
    scale = _bn_weight(bn) / (bn.running_var.double() + bn.eps).sqrt()
    conv_bias = torch.zeros_like(scale) if bias is None else bias.double()
    fused_weight = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return fused_weight, _bn_bias(bn) + (conv_bias - bn.running_mean.double()) * scale


def fuse_conv_bn_modules(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """A new conv with a bias that computes `bn(conv(x))` of the eval-mode pair (any Conv2d + BatchNorm2d)."""
    weight, bias = fuse_conv_bn(conv.weight, conv.bias, bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused.to(device=conv.weight.device, dtype=conv.weight.dtype)


def pad_kernel(weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad a square k×k kernel to `kernel_size` (both odd), centred: a 1×1 conv with padding 0 equals the
    padded 3×3 conv with padding 1, at any stride."""
    k = weight.shape[-1]
    if k > kernel_size or (kernel_size - k) % 2:
        raise ValueError(f"cannot pad a {k}x{k} kernel to {kernel_size}x{kernel_size}")
    p = (kernel_size - k) // 2
    return torch.nn.functional.pad(weight, (p, p, p, p))


def identity_kernel(channels: int, groups: int, kernel_size: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The kernel of a grouped conv that returns its input: W[i, i mod (channels/groups), centre] = 1."""
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    centre = kernel_size // 2
    index = torch.arange(channels, device=device)
    weight[index, index % per_group, centre, centre] = 1.0
    return weight


def branch_kernel_size(kind: str) -> int | None:
    """Kernel size of a branch kind ("3x3" -> 3, "1x1" -> 1), None for "identity"; ValueError otherwise."""
    if kind == IDENTITY:
        return None
    match = _KERNEL_KIND.match(kind)
    if match is None or int(match.group(1)) % 2 == 0:
        raise ValueError(f"unknown branch kind {kind!r}: use 'kxk' with k odd (e.g. '3x3', '1x1') or 'identity'")
    return int(match.group(1))


class RepBranches(nn.Module):
    """Parallel linear branches of one conv geometry; the output is their sum.

    Each branch is a `kind` ("kxk" conv with padding k//2, or "identity") followed by BN(out_channels) when
    `with_bn`; without BN the convs are bare and the identity branch is `nn.Identity`. Every conv has the
    layer's stride and groups and no bias; BN γ starts at `bn_gamma_init`. In eval mode the whole layer equals
    one conv of `kernel_size` (`merge_branches`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, kinds: Sequence[str],
                 stride: int = 1, groups: int = 1, with_bn: bool = True, bn_gamma_init: float = 1.0) -> None:
        super().__init__()
        if not kinds:
            raise ValueError("RepBranches needs at least one branch")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.groups, self.with_bn = stride, groups, with_bn
        self.kinds = list(kinds)
        for kind in self.kinds:
            check_branch_kind(kind, in_channels, out_channels, kernel_size, stride, groups)
        self.branches = nn.ModuleList(self._branch(kind, bn_gamma_init) for kind in self.kinds)

    def _branch(self, kind: str, bn_gamma_init: float) -> nn.Module:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        k = branch_kernel_size(kind)
        if k is not None:
            layers["conv"] = nn.Conv2d(self.in_channels, self.out_channels, k, self.stride, k // 2,
                                       groups=self.groups, bias=False)
        if self.with_bn:
            layers["bn"] = nn.BatchNorm2d(self.out_channels)
            nn.init.constant_(layers["bn"].weight, bn_gamma_init)
        return nn.Sequential(layers) if layers else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, kinds={self.kinds}, with_bn={self.with_bn}")


def check_branch_kind(kind: str, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                      groups: int) -> None:
    """ValueError unless a branch of `kind` can sit beside (and merge into) a conv of this geometry."""
    k = branch_kernel_size(kind)
    if k is None:
        if in_channels != out_channels or stride != 1:
            raise ValueError(f"an identity branch needs in_channels == out_channels and stride 1, got "
                             f"{in_channels} -> {out_channels} at stride {stride}")
    elif k > kernel_size:
        raise ValueError(f"a {kind} branch cannot merge into a {kernel_size}x{kernel_size} conv (larger kernel)")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels {in_channels} -> {out_channels} are not divisible by groups={groups}")


def branch_kernel(branch: nn.Module, layer: RepBranches) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel (padded to the layer's size) and bias of one eval-mode branch of `layer`, float64."""
    conv = getattr(branch, "conv", None)
    bn = getattr(branch, "bn", None)
    if conv is not None:
        weight = pad_kernel(conv.weight.double(), layer.kernel_size)
        device = conv.weight.device
    else:
        device = next(layer.parameters(), torch.empty(0)).device
        weight = identity_kernel(layer.in_channels, layer.groups, layer.kernel_size, device=device)
    if bn is None:
        return weight, torch.zeros(layer.out_channels, dtype=torch.float64, device=device)
    return fuse_conv_bn(weight, None, bn)


def merge_branches(layer: RepBranches) -> tuple[torch.Tensor, torch.Tensor]:
    """The single kernel W* = Σ W'_j and bias b* = Σ b'_j equal to `layer` in eval mode (float64)."""
    parts = [branch_kernel(branch, layer) for branch in layer.branches]
    return sum(w for w, _ in parts), sum(b for _, b in parts)


@torch.no_grad()
def load_into_conv_bn(conv: nn.Conv2d, bn: _BatchNorm | None, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write a merged kernel and bias into a plain layer, which then computes `conv(x, weight) + bias` in eval mode.

    With a BN: conv.weight ← W, conv.bias (if any) ← 0, BN γ ← 1, β ← b, running mean ← 0, running var ← 1 − ε
    (so √(var + ε) = 1). Without one (a bare conv): conv.weight ← W and the bias goes into conv.bias, which
    must then exist unless the bias is zero.
    """
    conv.weight.copy_(weight)
    if bn is not None:
        if conv.bias is not None:
            conv.bias.zero_()
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    elif conv.bias is not None:
        conv.bias.copy_(bias)
    elif bool(bias.any()):
        raise ValueError("a bare conv without bias cannot hold a non-zero merged bias")


def _bn_weight(bn: _BatchNorm) -> torch.Tensor:
    return bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)


def _bn_bias(bn: _BatchNorm) -> torch.Tensor:
    return bn.bias.double() if bn.affine else torch.zeros_like(bn.running_var, dtype=torch.float64)
