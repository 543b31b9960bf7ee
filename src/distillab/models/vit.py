"""A small vision transformer as a StagedNet (`vit_tiny`), for Transformer -> CNN distillation.

Patch embedding (a p×p conv at stride p, plus learned position embeddings), `depth` pre-norm encoder blocks
split evenly into `stages`, a final LayerNorm (`head.pre`), mean pooling over the tokens and a linear
classifier. There is no class token: between modules the tokens travel as B×C×√N×√N maps, so every stage,
block and `head.pre` output is a feature map that feature-based methods can tap, and `forward_from` works.
Position embeddings are learned for an `image_size` input and interpolated (bicubic) for other grid sizes.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from distillab.models.registry import register
from distillab.models.staged import ClassifierHead, StagedNet


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W -> B×(H·W)×C."""
    return x.flatten(2).transpose(1, 2)


def to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B×(H·W)×C -> B×C×H×W."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def conv_stem(in_channels: int, dim: int, patch_size: int) -> nn.Sequential:
    """log2(p) 3×3 stride-2 conv-BN-ReLU layers (channels doubling up to dim/2), then a 1×1 conv to `dim`: the
    same p-fold reduction as a p×p patch projection, with the small convolutional stem that Xiao et al. (2021,
    "Early convolutions help transformers see better") found to make ViTs train faster and more stably."""
    steps = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << steps != patch_size:
        raise ValueError(f"a conv stem needs a patch_size that is a power of 2 (>= 2), got {patch_size}")
    widths = [in_channels] + [max(dim >> (steps - i), 8) for i in range(steps)]
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], dim, 1))


class PatchEmbedding(nn.Module):
    """Non-overlapping p×p patches (or a conv stem of the same reduction) projected to `dim` channels, plus
    learned position embeddings."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, image_size: int, conv: bool = False) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.proj = (conv_stem(in_channels, dim, patch_size) if conv
                     else nn.Conv2d(in_channels, dim, patch_size, stride=patch_size))
        grid = image_size // patch_size
        self.position = nn.Parameter(torch.zeros(1, dim, grid, grid))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        position = self.position
        if position.shape[-2:] != x.shape[-2:]:
            position = F.interpolate(position, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return x + position


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, scaled dot-product attention, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block on a token map: x + attn(LN(x)), then x + MLP(LN(x)) (GELU, `mlp_ratio`·dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = to_tokens(x)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return to_map(tokens, h, w)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a B×C×H×W map (each token normalised on its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class VisionTransformer(StagedNet):
    """ViT with mean pooling: patch embedding (stem; `conv_stem=True`: a small conv stack instead of the p×p
    projection), `depth` blocks in `stages` stages, LayerNorm, pool, fc."""

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        stages: int = 3,
        conv_stem: bool = False,
    ) -> None:
        super().__init__(in_channels)
        if not 1 <= stages <= depth:
            raise ValueError(f"stages must be in [1, depth={depth}], got {stages}")
        self.image_size = image_size
        self.stem = PatchEmbedding(in_channels, dim, patch_size, image_size, conv=conv_stem)
        sizes = [depth // stages + (i < depth % stages) for i in range(stages)]
        self.stages = nn.ModuleList(
            nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(n)]) for n in sizes
        )
        self.head = ClassifierHead(dim, num_classes, pre=ChannelLayerNorm(dim))
        self.declare_stages([dim] * stages, [1] * stages, stem_stride=patch_size)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


register("vit_tiny")(VisionTransformer)
