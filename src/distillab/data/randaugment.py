"""The strong view of two-view methods (MLKD, UniKD's Variant B), on the device, a whole batch at once.

Per image: its own crop and flip (drawn apart from the weak view's), then RandAugment as FixMatch and MLKD use it
(2 ops drawn with replacement from the 14 below, each at a uniform random magnitude of its range), then Cutout of
a square of side up to half the image, filled with the dataset's mean colour. Every draw is made per epoch on the
CPU from the loader's seed and indexed by the image's position in the epoch (like the weak view's crops), so a
data-parallel run sees the same views as one process. The ops follow PIL's (which the reference pipelines use)
closely but not bit for bit: geometric ops sample the nearest pixel about the image centre, filling with black;
Equalize uses PIL's rule on each image's 256-bin histogram; grey images skip nothing (Color is the identity).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# (name, low, high): the magnitude range of each op (FixMatch's list, as MLKD's CIFAR pipeline uses it)
OPS = (("auto_contrast", 0.0, 1.0), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95),
       ("equalize", 0.0, 1.0), ("identity", 0.0, 1.0), ("posterize", 4.0, 8.0), ("rotate", -30.0, 30.0),
       ("sharpness", 0.05, 0.95), ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0.0, 256.0),
       ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3))
OP_INDEX = {name: i for i, (name, _, _) in enumerate(OPS)}
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
NUM_OPS = 2
MAX_CUTOUT = 0.5  # of the image side


def draw_strong(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per image: the two ops (n x 2), their magnitudes in their ranges (n x 2), and Cutout's side (a fraction of
    the image) and centre (fractions of height and width), n x 3."""
    ops = torch.randint(0, len(OPS), (n, NUM_OPS), generator=gen)
    low = torch.tensor([lo for _, lo, _ in OPS])[ops]
    high = torch.tensor([hi for _, _, hi in OPS])[ops]
    magnitudes = low + (high - low) * torch.rand(n, NUM_OPS, generator=gen)
    cutout = torch.rand(n, 3, generator=gen) * torch.tensor([MAX_CUTOUT, 1.0, 1.0])
    return {"ops": ops, "magnitudes": magnitudes, "cutout": cutout}


def rand_augment(images: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor, cutout: torch.Tensor,
                 fill: torch.Tensor) -> torch.Tensor:
    """The strong view of a B x C x H x W batch with values in [0, 255] (any float or uint8 dtype); returns float32
    in [0, 255]. `fill` is the Cutout colour, C values in [0, 255]."""
    x = images.float()
    for slot in range(ops.shape[1]):
        x = apply_op(x, ops[:, slot], magnitudes[:, slot])
    return cut_out(x, cutout, fill)


def apply_op(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each image's own op at its own magnitude (every op is computed for the batch and selected: no host sync)."""
    out = x
    geometric = torch.zeros_like(op, dtype=torch.bool)
    for name in GEOMETRIC:
        geometric |= op == OP_INDEX[name]
    out = torch.where(geometric[:, None, None, None], warp(x, affine_matrices(op, v, x.shape[-2:])), out)
    for name, fn in PHOTOMETRIC.items():
        out = torch.where((op == OP_INDEX[name])[:, None, None, None], fn(x, v[:, None, None, None]), out)
    return out


def affine_matrices(op: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x 2 x 3 maps from output to input pixel offsets about the centre (identity for the other ops)."""
    h, w = size
    b = op.shape[0]
    m = torch.zeros(b, 2, 3, device=v.device, dtype=torch.float32)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    angle = torch.where(op == OP_INDEX["rotate"], v, torch.zeros_like(v)) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotating = op == OP_INDEX["rotate"]
    m[:, 0, 0] = torch.where(rotating, cos, m[:, 0, 0])
    m[:, 0, 1] = torch.where(rotating, sin, m[:, 0, 1])
    m[:, 1, 0] = torch.where(rotating, -sin, m[:, 1, 0])
    m[:, 1, 1] = torch.where(rotating, cos, m[:, 1, 1])
    m[:, 0, 1] = torch.where(op == OP_INDEX["shear_x"], v, m[:, 0, 1])  # input x = x + v * y
    m[:, 1, 0] = torch.where(op == OP_INDEX["shear_y"], v, m[:, 1, 0])  # input y = y + v * x
    m[:, 0, 2] = torch.where(op == OP_INDEX["translate_x"], v * w, m[:, 0, 2])  # input x = x + v * W
    m[:, 1, 2] = torch.where(op == OP_INDEX["translate_y"], v * h, m[:, 1, 2])
    return m


def warp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Nearest-pixel resampling: output pixel p (offsets from the centre, in pixels) takes input pixel m @ (p, 1);
    outside the image is 0."""
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).view(1, h * w, 3)
    source = points @ m.transpose(1, 2)  # B x HW x 2, (x, y) offsets in the input
    norm = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=x.device).clamp(min=0.5)
    grid = (source / norm).view(b, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=True)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's luma (ITU-R 601) for RGB, the image itself for one channel; B x 1 x H x W."""
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x.mean(dim=1, keepdim=True)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 255]."""
    return (degenerate + factor * (x - degenerate)).clamp(0.0, 255.0)


def auto_contrast(x: torch.Tensor, _v: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x).clamp(0.0, 255.0)


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, v)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _blend(_grey(x).expand_as(x), x, v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True).round()
    return _blend(mean.expand_as(x), x, v)


def equalize(x: torch.Tensor, _v: torch.Tensor) -> torch.Tensor:
    """PIL's rule per channel: step = (pixels - count of the last used level) // 255; level i maps to
    (pixels below i + step // 2) // step; a channel with step 0 is left alone."""
    b, c, h, w = x.shape
    levels = x.round().clamp(0, 255).long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    last = (hist > 0).float().cumsum(1).argmax(1, keepdim=True)  # the highest level present
    step = ((h * w - hist.gather(1, last)) // 255).clamp(min=0)
    below = hist.cumsum(1) - hist
    lut = torch.where(step > 0, ((below + step // 2) // step.clamp(min=1)).clamp(max=255), torch.arange(
        256, device=x.device, dtype=torch.float).expand(b * c, 256))
    return lut.gather(1, levels).view(b, c, h, w)


def posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keep int(v) bits (4 to 8) of each 8-bit value."""
    drop = 2.0 ** (8 - v.floor().clamp(1, 8))
    return (x.round().clamp(0, 255) / drop).floor() * drop


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, / 13); the border keeps its pixels."""
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c).round()
    border = torch.ones_like(x[:1, :1], dtype=torch.bool)
    border[..., 1:-1, 1:-1] = False
    return _blend(torch.where(border, x, smooth), x, v)


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= v, 255.0 - x, x)


PHOTOMETRIC = {"auto_contrast": auto_contrast, "brightness": brightness, "color": color, "contrast": contrast,
               "equalize": equalize, "posterize": posterize, "sharpness": sharpness, "solarize": solarize}


def cut_out(x: torch.Tensor, cutout: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """A square of side cutout[:, 0] * W (FixMatch's rule: its corner at the drawn centre minus half the side,
    clipped to the image) filled with `fill`."""
    h, w = x.shape[-2:]
    side = cutout[:, 0] * w
    x0 = (cutout[:, 2] * w - side / 2).clamp(min=0).floor()
    y0 = (cutout[:, 1] * h - side / 2).clamp(min=0).floor()
    cols = torch.arange(w, device=x.device, dtype=torch.float32)
    rows = torch.arange(h, device=x.device, dtype=torch.float32)
    inside_x = (cols[None] >= x0[:, None]) & (cols[None] <= (x0 + side)[:, None]) & (side[:, None] > 0)
    inside_y = (rows[None] >= y0[:, None]) & (rows[None] <= (y0 + side)[:, None]) & (side[:, None] > 0)
    box = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return torch.where(box, fill.view(1, -1, 1, 1).to(x), x)
