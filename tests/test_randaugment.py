"""The strong view (RandAugment + Cutout on the device): each op against PIL's, the geometry, Cutout, the loader."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from distillab import data as dd
from distillab.config import AugmentConfig
from distillab.data.randaugment import OP_INDEX, OPS, apply_op, cut_out, draw_strong, rand_augment


def images(n=4, channels=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def op(name, x, v):
    n = x.shape[0]
    return apply_op(x.float(), torch.full((n,), OP_INDEX[name]), torch.full((n,), float(v)))


def pil(x):
    return Image.fromarray(x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x[0].numpy())


def from_pil(img, channels):
    a = torch.from_numpy(np.array(img)).float()
    return a.permute(2, 0, 1) if channels == 3 else a[None]


PIL_OPS = {
    "auto_contrast": lambda img, v: ImageOps.autocontrast(img),
    "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "equalize": lambda img, v: ImageOps.equalize(img),
    "posterize": lambda img, v: ImageOps.posterize(img, int(v)),
    "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "solarize": lambda img, v: ImageOps.solarize(img, v),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("name", "v"), [("auto_contrast", 0), ("brightness", 0.3), ("color", 0.4),
                                         ("contrast", 0.6), ("equalize", 0), ("posterize", 5.7),
                                         ("sharpness", 0.2), ("solarize", 100)])
def test_photometric_ops_match_pil_within_one_level(name, v, channels):
    x = images(channels=channels)
    ours = op(name, x, v)
    for i in range(len(x)):
        theirs = from_pil(PIL_OPS[name](pil(x[i]), v), channels)
        assert (ours[i].round() - theirs).abs().max() <= 1.0, name  # PIL rounds its float arithmetic to uint8


def test_every_op_is_in_range_and_the_list_is_fixmatchs():
    assert [name for name, _, _ in OPS] == [
        "auto_contrast", "brightness", "color", "contrast", "equalize", "identity", "posterize", "rotate",
        "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y"]
    x = images()
    for name, _, hi in OPS:
        out = op(name, x, hi)
        assert out.min() >= 0 and out.max() <= 255 and out.shape == x.shape
    assert torch.equal(op("identity", x, 0.5), x.float())


def test_geometric_ops_move_pixels_as_their_definitions_say():
    x = images(1, 1, 8)
    right = op("translate_x", x, 0.25)  # input x = x + 2: the image moves 2 pixels left, zeros come in
    assert torch.equal(right[..., :6], x.float()[..., 2:]) and not right[..., 6:].any()
    down = op("translate_y", x, -0.25)
    assert torch.equal(down[..., 2:, :], x.float()[..., :6, :]) and not down[..., :2, :].any()
    quarter = op("rotate", x, 90.0)
    assert torch.equal(quarter, torch.rot90(x.float(), 1, dims=(2, 3))) or torch.equal(
        quarter, torch.rot90(x.float(), -1, dims=(2, 3)))
    sheared = op("shear_x", x, 2 / 7)  # row offset from the centre dy -> a shift of 2/7 * dy: +-1 at the edges
    assert torch.equal(sheared[0, 0, 3, 1:], x.float()[0, 0, 3, 1:]) or torch.equal(
        sheared[0, 0, 3, :7], x.float()[0, 0, 3, :7])


def test_cutout_fills_a_square_of_the_drawn_side():
    x = torch.zeros(2, 3, 20, 20)
    fill = torch.tensor([125.0, 123.0, 114.0])
    out = cut_out(x, torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.5, 0.5]]), fill)
    box = out[0, 0] > 0
    assert box.sum() == 11 * 11  # side 10 from corner (5, 5) to (15, 15), both edges included, as PIL draws it
    assert torch.equal(out[0, :, 10, 10], fill) and not out[1].any()  # side 0: nothing


def test_rand_augment_applies_two_drawn_ops_then_cutout():
    x = images(6)
    draws = draw_strong(6, torch.Generator().manual_seed(3))
    assert draws["ops"].shape == (6, 2) and draws["cutout"][:, 0].max() <= 0.5
    lo = torch.tensor([lo for _, lo, _ in OPS])[draws["ops"]]
    hi = torch.tensor([hi for _, _, hi in OPS])[draws["ops"]]
    assert ((draws["magnitudes"] >= lo) & (draws["magnitudes"] <= hi)).all()
    fill = torch.tensor([1.0, 2.0, 3.0])
    out = rand_augment(x, draws["ops"], draws["magnitudes"], draws["cutout"], fill)
    by_hand = x.float()
    for slot in range(2):
        by_hand = apply_op(by_hand, draws["ops"][:, slot], draws["magnitudes"][:, slot])
    assert torch.equal(out, cut_out(by_hand, draws["cutout"], fill))


def indexed(n, size=8):
    imgs = (torch.arange(n, dtype=torch.uint8) * 7).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return dd.ImageDataset(imgs, torch.arange(n), n, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "indexed")


def test_the_loader_adds_a_strong_view_reproducibly_and_shard_independently():
    aug = AugmentConfig(crop_padding=2, flip=True)
    loader = dd.DeviceLoader(indexed(16), 4, seed=5, augment=aug, strong_view=True)
    batches = list(loader)
    assert all(len(b) == 3 for b in batches)
    x, _, strong = batches[0]
    assert strong.shape == x.shape and strong.dtype == torch.float32 and not torch.equal(strong, x)
    again = list(dd.DeviceLoader(indexed(16), 4, seed=5, augment=aug, strong_view=True))
    assert all(torch.equal(a, b) for p, q in zip(batches, again, strict=True) for a, b in zip(p, q, strict=True))
    plain = list(dd.DeviceLoader(indexed(16), 4, seed=5, augment=aug))
    assert all(torch.equal(p[0], b[0]) for p, b in zip(plain, batches, strict=True))  # the weak view is unchanged
    # two ranks see, image for image, the views one process sees with the same global batch
    whole = dd.DeviceLoader(indexed(16), 8, seed=5, augment=aug, strong_view=True)
    one = {int(label): view for _, ys, views in whole for label, view in zip(ys, views, strict=True)}
    for rank in range(2):
        shard = dd.DeviceLoader(indexed(16), 4, seed=5, augment=aug, strong_view=True, rank=rank, world_size=2)
        for _, ys, views in shard:
            for label, view in zip(ys, views, strict=True):
                assert torch.equal(view, one[int(label)])
