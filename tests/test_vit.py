"""vit_tiny: parameter count from an independent formula, token maps, pre-norm blocks, mean pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillab.features import FeatureTap
from distillab.models import build
from distillab.models.vit import Attention, EncoderBlock

SMALL = {"image_size": 28, "patch_size": 4, "dim": 64, "depth": 5, "heads": 4, "mlp_ratio": 3.0, "stages": 3}


def vit_params(in_channels: int, num_classes: int, image_size: int, patch_size: int, dim: int, depth: int,
               mlp_ratio: float, **_) -> int:
    hidden = int(dim * mlp_ratio)
    patches = in_channels * patch_size**2 * dim + dim  # p×p conv with bias
    positions = dim * (image_size // patch_size) ** 2
    block = 2 * 2 * dim + 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim  # 2 LN, qkv + proj, MLP
    return patches + positions + depth * block + 2 * dim + dim * num_classes + num_classes


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build("vit_tiny", num_classes=10, in_channels=1, **SMALL).eval()


def test_parameter_count_follows_the_formula(small):
    assert sum(p.numel() for p in small.parameters()) == vit_params(1, 10, **SMALL) == 213_642
    default = build("vit_tiny", num_classes=100)
    assert sum(p.numel() for p in default.parameters()) == vit_params(3, 100, 32, 4, 128, 6, 2.0) == 822_500


def test_conv_stem_halves_the_grid_per_layer_to_the_patch_grid():
    # patch 4 -> two stride-2 3x3 conv-BN-ReLU layers (1 -> 16 -> 32 channels at dim 64), then a 1x1 conv to dim
    model = build("vit_tiny", num_classes=10, in_channels=1, conv_stem=True, **SMALL).eval()
    stem = 1 * 16 * 9 + 2 * 16 + 16 * 32 * 9 + 2 * 32 + 32 * 64 + 64
    patches = 1 * 4**2 * 64 + 64
    assert sum(p.numel() for p in model.parameters()) == vit_params(1, 10, **SMALL) - patches + stem
    with FeatureTap(model, ["stem"]) as tap, torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert tap["stem"].shape == (2, 64, 7, 7)
    with pytest.raises(ValueError, match="power of 2"):
        build("vit_tiny", image_size=30, patch_size=3, conv_stem=True)


def test_depth_is_split_evenly_over_the_stages(small):
    assert [len(stage) for stage in small.stages] == [2, 2, 1]
    with pytest.raises(ValueError, match="stages"):
        build("vit_tiny", depth=2, stages=3)


@pytest.mark.parametrize(("in_channels", "size", "grid"), [(1, 28, 7), (3, 32, 8)])
def test_tokens_travel_as_square_maps(in_channels, size, grid):
    model = build("vit_tiny", num_classes=10, in_channels=in_channels, image_size=size, dim=32, depth=2, heads=2,
                  stages=2).eval()
    assert model.input_size == (in_channels, size, size)
    assert model.stage_shapes() == [(32, grid, grid)] * 2
    names = ["stem", "stages.0", "stages.1.0", "head.pre"]
    with FeatureTap(model, names) as tap, torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 10)
    assert all(tap[n].shape == (2, 32, grid, grid) for n in names)


def test_forward_from_every_stage_equals_forward(small):
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits = small(x)
        h = small.stem(x)
        for i in range(len(small.stages) + 1):
            torch.testing.assert_close(small.forward_from(i, h), logits)
            if i < len(small.stages):
                h = small.stages[i](h)


def test_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = Attention(16, 4)
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv.weight)
        reference.in_proj_bias.copy_(ours.qkv.bias)
        reference.out_proj.weight.copy_(ours.proj.weight)
        reference.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(ours(x), reference(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = EncoderBlock(8, 2, 2.0)
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
        block.mlp[2].weight.zero_()
        block.mlp[2].bias.fill_(0.5)
        # attention adds nothing; the MLP adds its last bias to every token
        torch.testing.assert_close(block(x), x + 0.5)


def test_head_is_layer_norm_then_mean_over_tokens(small):
    h = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        tokens = h.flatten(2).transpose(1, 2)
        normed = F.layer_norm(tokens, (64,), small.head.pre.weight, small.head.pre.bias)
        expected = small.head.fc(normed.mean(1))
        torch.testing.assert_close(small.head(h), expected)


def test_position_embeddings_are_interpolated_only_for_another_grid(small):
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        native = small.stem(x)
        torch.testing.assert_close(native, small.stem.proj(x) + small.stem.position)
        assert small.stem(torch.randn(1, 1, 16, 16)).shape == (1, 64, 4, 4)


@pytest.mark.parametrize(("kwargs", "message"), [({"image_size": 30}, "multiple of patch_size"),
                                                 ({"dim": 30, "heads": 4}, "divisible by heads")])
def test_bad_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("vit_tiny", **kwargs)
