"""Structural re-parameterization: conv+BN folding, kernel padding, identity kernels, branch merging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillab.reparam import (
    RepBranches,
    check_branch_kind,
    fuse_conv_bn,
    fuse_conv_bn_modules,
    identity_kernel,
    load_into_conv_bn,
    merge_branches,
    pad_kernel,
)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random γ, β, running mean and running var for every BN of `model`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)


def test_fold_of_one_channel_by_hand():
    # conv weight 2, BN γ=3, β=1, μ=0.5, σ²+ε = 4: W' = 2·3/2 = 3, b' = 1 + (0 − 0.5)·3/2 = 0.25.
    bn = nn.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        bn.weight.fill_(3.0)
        bn.bias.fill_(1.0)
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(3.0)
    weight, bias = fuse_conv_bn(torch.full((1, 1, 1, 1), 2.0), None, bn)
    assert weight.item() == 3.0 and bias.item() == 0.25
    # with a conv bias of 1: b' = 1 + (1 − 0.5)·3/2 = 1.75
    assert fuse_conv_bn(torch.full((1, 1, 1, 1), 2.0), torch.ones(1), bn)[1].item() == 1.75


@pytest.mark.parametrize(("groups", "bias", "stride"), [(1, False, 1), (1, True, 2), (3, False, 1), (6, True, 1)])
def test_fused_conv_equals_conv_then_bn_in_eval(groups, bias, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, stride, 1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(12)
    randomize_bn(bn)
    bn.eval()
    x = torch.randn(4, 6, 9, 9)
    torch.testing.assert_close(fuse_conv_bn_modules(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_padded_1x1_kernel_is_the_same_conv(stride):
    torch.manual_seed(0)
    w = torch.randn(5, 4, 1, 1)
    x = torch.randn(2, 4, 7, 7)
    padded = pad_kernel(w, 3)
    assert padded.shape == (5, 4, 3, 3) and padded[:, :, 1, 1].equal(w[:, :, 0, 0])
    assert padded.abs().sum() == w.abs().sum()
    torch.testing.assert_close(F.conv2d(x, padded, stride=stride, padding=1), F.conv2d(x, w, stride=stride))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_identity_kernel_returns_the_input(groups):
    x = torch.randn(2, 8, 5, 5)
    w = identity_kernel(8, groups, 3, dtype=torch.float32)
    assert w.shape == (8, 8 // groups, 3, 3) and w.sum() == 8
    assert torch.equal(F.conv2d(x, w, padding=1, groups=groups), x)


def _merged_conv(layer: RepBranches) -> nn.Conv2d:
    weight, bias = merge_branches(layer)
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                     layer.kernel_size // 2, groups=layer.groups)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


KINDS = {
    1: [["3x3"], ["1x1"], ["identity"]],
    2: [["3x3", "3x3"], ["3x3", "identity"]],
    4: [["3x3"] * 4, ["3x3", "3x3", "1x1", "identity"], ["1x1", "1x1", "identity", "identity"]],
}


@pytest.mark.parametrize("with_bn", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kinds", [k for ks in KINDS.values() for k in ks], ids=lambda k: "+".join(k))
def test_merged_kernel_equals_the_branches_in_eval(kinds, groups, with_bn):
    torch.manual_seed(0)
    layer = RepBranches(8, 8, 3, kinds, groups=groups, with_bn=with_bn)
    randomize_bn(layer, seed=1)
    layer.eval()
    x = torch.randn(4, 8, 6, 6)
    out = layer(x)
    assert (out - _merged_conv(layer)(x)).abs().max() < 1e-5
    assert out.abs().mean() > 0.1  # not a trivially small output


@pytest.mark.parametrize("kinds", [["3x3", "1x1"], ["1x1", "1x1", "1x1"]])
def test_merge_at_stride_two_with_channel_change(kinds):
    torch.manual_seed(0)
    kernel = 3 if "3x3" in kinds else 1
    layer = RepBranches(6, 9, kernel, kinds, stride=2, groups=3)
    randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, 6, 9, 9)
    assert (layer(x) - _merged_conv(layer)(x)).abs().max() < 1e-5


def test_train_mode_bn_is_not_mergeable():
    torch.manual_seed(0)
    layer = RepBranches(4, 4, 3, ["3x3", "1x1"])
    randomize_bn(layer)
    x = torch.randn(8, 4, 6, 6)
    merged = _merged_conv(layer.eval())
    assert (layer.train()(x) - merged(x)).abs().max() > 1e-2  # batch statistics, not running ones


def test_plain_conv_bn_holds_the_merged_layer():
    torch.manual_seed(0)
    layer = RepBranches(4, 4, 3, ["3x3", "1x1", "identity"])
    randomize_bn(layer)
    layer.eval()
    weight, bias = merge_branches(layer)
    conv, bn = nn.Conv2d(4, 4, 3, 1, 1, bias=True), nn.BatchNorm2d(4)  # a biased conv (VGG) gets bias 0
    load_into_conv_bn(conv, bn, weight.float(), bias.float())
    assert torch.equal(conv.bias, torch.zeros(4)) and torch.equal(bn.weight, torch.ones(4))
    x = torch.randn(2, 4, 5, 5)
    assert (bn.eval()(conv(x)) - layer(x)).abs().max() < 1e-5


def test_bare_conv_without_bias_refuses_a_nonzero_bias():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    load_into_conv_bn(conv, None, torch.ones(2, 2, 1, 1), torch.zeros(2))
    assert torch.equal(conv.weight, torch.ones(2, 2, 1, 1))
    with pytest.raises(ValueError, match="non-zero merged bias"):
        load_into_conv_bn(conv, None, torch.ones(2, 2, 1, 1), torch.ones(2))


def test_bare_branches_have_no_bn_and_bare_identity_no_parameters():
    layer = RepBranches(4, 4, 3, ["3x3", "identity"], with_bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
    assert isinstance(layer.branches[1], nn.Identity)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 4 * 9


def test_branch_bn_gamma_starts_at_the_given_value():
    layer = RepBranches(4, 4, 1, ["1x1", "identity"], bn_gamma_init=0.25)
    assert all(torch.equal(b.bn.weight, torch.full((4,), 0.25)) for b in layer.branches)


@pytest.mark.parametrize(
    ("kind", "geometry", "message"),
    [
        ("identity", (4, 4, 3, 2, 1), "identity branch needs"),
        ("identity", (4, 8, 1, 1, 1), "identity branch needs"),
        ("3x3", (4, 4, 1, 1, 1), "cannot merge into a 1x1"),
        ("2x2", (4, 4, 3, 1, 1), "unknown branch kind"),
        ("3x1", (4, 4, 3, 1, 1), "unknown branch kind"),
        ("1x1", (4, 6, 1, 1, 4), "not divisible by groups"),
    ],
)
def test_illegal_branches_are_refused(kind, geometry, message):
    with pytest.raises(ValueError, match=message):
        check_branch_kind(kind, *geometry)
