"""The CIFAR model zoo: parameter counts, stage shapes, forward_from, grayscale inputs, registry."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

from distillab.errors import UnknownNameError
from distillab.models import ClassifierHead, StagedNet, available, build

# Parameters at num_classes=100, in_channels=3. The first group is published (CRD README / protocol
# spec §3, and the standard CIFAR ResNet18/34); the second is derived from the same definitions by
# `_formula_params` below, which is checked against the published group.
PUBLISHED_PARAMS = {
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobile_half": 812_836,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet18": 11_220_132,
    "ResNet34": 21_328_292,
    "ResNet50": 23_705_252,
}
DERIVED_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet44": 667_188,
    "wrn_16_1": 180_916,
    "wrn_16_4": 2_772_020,
    "wrn_28_2": 1_479_220,
    "wrn_28_4": 5_872_180,
    "vgg11": 9_277_284,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "vit_tiny": 822_500,
}
PARAMS = {**PUBLISHED_PARAMS, **DERIVED_PARAMS}

# Spec §3 "Exposed features": stem output, then one entry per stage, for a 32x32 input; pooled width.
FEATS = {
    **{
        name: ([(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 64)
        for name in ("resnet20", "resnet32", "resnet56", "resnet110")
    },
    **{
        name: ([(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], 256)
        for name in ("resnet8x4", "resnet32x4")
    },
    **{
        name: ([(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)], 128)
        for name in ("wrn_40_2", "wrn_16_2")
    },
    "wrn_40_1": ([(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 64),
    **{
        name: ([(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512)
        for name in ("vgg8", "vgg13")
    },
    **{
        name: ([(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280)
        for name in ("mobile_half", "MobileNetV2")
    },
    "ShuffleV1": ([(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], 960),
    "ShuffleV2": ([(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),
    "ResNet50": ([(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)], 2048),
}


# ---- an independent parameter count, from the architecture definitions alone ----------------------


def _conv(cin: int, cout: int, k: int, groups: int = 1, bias: bool = False) -> int:
    return cin // groups * cout * k * k + (cout if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _fc(i: int, o: int) -> int:
    return i * o + o


def _resnet_cifar(depth: int, widths: tuple[int, ...], nc: int) -> int:
    n = (depth - 2) // 6
    total = _conv(3, widths[0], 3) + _bn(widths[0])
    cin = widths[0]
    for s, w in enumerate(widths[1:]):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            total += _conv(cin, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
            if stride != 1 or cin != w:
                total += _conv(cin, w, 1) + _bn(w)
            cin = w
    return total + _fc(widths[-1], nc)


def _wrn(depth: int, k: int, nc: int) -> int:
    # Pre-activation block: BN(in), conv3x3(in->out), BN(out), conv3x3(out->out); a 1x1 shortcut conv only
    # when in != out; biasless convs; one final BN; fc with bias.
    n = (depth - 4) // 6
    total = _conv(3, 16, 3)
    cin = 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += _bn(cin) + _conv(cin, w, 3) + _bn(w) + _conv(w, w, 3)
            if cin != w:
                total += _conv(cin, w, 1)
            cin = w
    return total + _bn(cin) + _fc(cin, nc)


def _vgg(cfg: list[list[int]], nc: int) -> int:
    total, cin = 0, 3
    for block in cfg:
        for w in block:
            total += _conv(cin, w, 3, bias=True) + _bn(w)
            cin = w
    return total + _fc(512, nc)


def _mobile_half(nc: int) -> int:
    total = _conv(3, 16, 3) + _bn(16)
    cin = 16
    for t, c, n in [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]:
        out = c // 2
        for _ in range(n):
            h = cin * t
            total += _conv(cin, h, 1) + _bn(h) + _conv(h, h, 3, groups=h) + _bn(h)
            total += _conv(h, out, 1) + _bn(out)
            cin = out
    return total + _conv(cin, 1280, 1) + _bn(1280) + _fc(1280, nc)


def _shuffle_v1(nc: int) -> int:
    total = _conv(3, 24, 1) + _bn(24)
    cin = 24
    for planes, n in [(240, 4), (480, 8), (960, 4)]:
        for b in range(n):
            out = planes - cin if b == 0 else planes
            mid = out // 4
            g1 = 1 if cin == 24 else 3
            total += _conv(cin, mid, 1, g1) + _bn(mid) + _conv(mid, mid, 3, mid) + _bn(mid)
            total += _conv(mid, out, 1, 3) + _bn(out)
            cin = planes
    return total + _fc(960, nc)


def _shuffle_v2(nc: int) -> int:
    total = _conv(3, 24, 1) + _bn(24)
    cin = 24
    for planes, n in [(116, 3), (232, 7), (464, 3)]:
        m = planes // 2
        total += _conv(cin, cin, 3, cin) + _bn(cin) + _conv(cin, m, 1) + _bn(m)  # down unit, left
        total += _conv(cin, m, 1) + _bn(m) + _conv(m, m, 3, m) + _bn(m) + _conv(m, m, 1) + _bn(m)  # right
        total += n * (2 * (_conv(m, m, 1) + _bn(m)) + _conv(m, m, 3, m) + _bn(m))
        cin = planes
    return total + _conv(464, 1024, 1) + _bn(1024) + _fc(1024, nc)


def _resnet4(bottleneck: bool, blocks: tuple[int, ...], nc: int) -> int:
    exp = 4 if bottleneck else 1
    total = _conv(3, 64, 3) + _bn(64)
    cin = 64
    for s, (p, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            if bottleneck:
                total += _conv(cin, p, 1) + _bn(p) + _conv(p, p, 3) + _bn(p) + _conv(p, 4 * p, 1) + _bn(4 * p)
            else:
                total += _conv(cin, p, 3) + _bn(p) + _conv(p, p, 3) + _bn(p)
            if stride != 1 or cin != p * exp:
                total += _conv(cin, p * exp, 1) + _bn(p * exp)
            cin = p * exp
    return total + _fc(cin, nc)


def _vit(nc: int, patch: int = 4, dim: int = 128, depth: int = 6, hidden: int = 256, grid: int = 8) -> int:
    # Patch conv (with bias), position embeddings, per block 2 LayerNorms + qkv + proj + 2-layer MLP
    # (all Linear with bias), the final LayerNorm, fc.
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return _conv(3, dim, patch, bias=True) + dim * grid * grid + depth * block + 2 * dim + _fc(dim, nc)


_VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _formula_params(name: str, nc: int = 100) -> int:
    if name.startswith("resnet"):
        depth, _, mult = name[len("resnet") :].partition("x")
        widths = (32, 64, 128, 256) if mult == "4" else (16, 16, 32, 64)
        return _resnet_cifar(int(depth), widths, nc)
    if name.startswith("wrn_"):
        _, depth, k = name.split("_")
        return _wrn(int(depth), int(k), nc)
    if name in _VGG_CFG:
        return _vgg(_VGG_CFG[name], nc)
    if name in ("mobile_half", "MobileNetV2"):
        return _mobile_half(nc)
    if name == "ShuffleV1":
        return _shuffle_v1(nc)
    if name == "ShuffleV2":
        return _shuffle_v2(nc)
    if name == "vit_tiny":
        return _vit(nc)
    blocks = {"ResNet18": (2, 2, 2, 2), "ResNet34": (3, 4, 6, 3), "ResNet50": (3, 4, 6, 3)}[name]
    return _resnet4(name == "ResNet50", blocks, nc)


# ---- helpers ---------------------------------------------------------------------------------------


@cache
def _model(name: str, num_classes: int = 100, in_channels: int = 3) -> StagedNet:
    torch.manual_seed(0)
    return build(name, num_classes=num_classes, in_channels=in_channels).eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


ALL = sorted(PARAMS)


# ---- tests -----------------------------------------------------------------------------------------


def test_available_lists_every_model():
    assert set(available()) == set(PARAMS)
    assert available() == sorted(available())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_formula_reproduces_published_counts(name):
    assert _formula_params(name) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(DERIVED_PARAMS))
def test_derived_counts_follow_the_formula(name):
    assert _formula_params(name) == DERIVED_PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_at_100_classes(name):
    assert _n_params(_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_is_staged_net_with_sequential_stages(name):
    model = _model(name)
    assert isinstance(model, StagedNet)
    assert isinstance(model.head, ClassifierHead)
    assert all(isinstance(stage, nn.Sequential) and len(stage) > 0 for stage in model.stages)


@pytest.mark.parametrize("name", sorted(FEATS))
def test_feature_shapes_match_spec_table(name):
    model = _model(name)
    feats, pooled = FEATS[name]
    with torch.no_grad():
        stem = model.stem(torch.zeros(1, 3, 32, 32))
    assert tuple(stem.shape[1:]) == feats[0]
    assert model.stage_shapes() == feats[1:]
    assert model.stage_channels == [c for c, _, _ in feats[1:]]
    assert model.head.fc.in_features == pooled


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mobile_half", (1280, 2, 2)),
        ("ShuffleV2", (1024, 4, 4)),
        ("wrn_40_2", (128, 8, 8)),
        ("vgg13", (512, 4, 4)),
    ],
)
def test_prepool_map_shape(name, shape):
    model = _model(name)
    with torch.no_grad():
        h = model.stem(torch.zeros(1, 3, 32, 32))
        for stage in model.stages:
            h = stage(h)
        assert tuple(model.head.pre(h).shape[1:]) == shape


@pytest.mark.parametrize("name", ALL)
def test_forward_from_every_stage_equals_forward(name):
    model = _model(name)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 100)
        h = model.stem(x)
        for i in range(len(model.stages) + 1):
            torch.testing.assert_close(model.forward_from(i, h), logits, rtol=1e-5, atol=1e-5)
            if i < len(model.stages):
                h = model.stages[i](h)


@pytest.mark.parametrize("name", ALL)
def test_grayscale_28px_input(name):
    model = _model(name, num_classes=10, in_channels=1)
    assert model.in_channels == 1
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_vgg_28px_pools_round_up():
    assert _model("vgg8", num_classes=10, in_channels=1).stage_shapes((1, 28, 28)) == [
        (128, 14, 14),
        (256, 7, 7),
        (512, 4, 4),
        (512, 4, 4),
    ]


@pytest.mark.parametrize("name", ALL)
def test_no_inplace_relu(name):
    # In-place activations would overwrite tensors that forward hooks have already recorded.
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in _model(name).modules())


@pytest.mark.parametrize(
    ("name", "last_conv", "last_bn"),
    [
        ("resnet8x4", "conv2", "bn2"),
        ("resnet20", "conv2", "bn2"),
        ("ResNet18", "conv2", "bn2"),
        ("ResNet50", "conv3", "bn3"),
        ("ShuffleV1", "conv3", "bn3"),
        ("ShuffleV2", "conv3", "bn3"),
    ],
)
def test_residual_blocks_expose_last_conv_bn_and_final_relu(name, last_conv, last_bn):
    model = _model(name)
    for stage in model.stages:
        block = stage[-1]
        assert isinstance(getattr(block, last_conv), nn.Conv2d)
        assert isinstance(getattr(block, last_bn), nn.BatchNorm2d)
        assert isinstance(block.relu, nn.ReLU)


def test_relu_input_is_the_preactivation():
    model = _model("resnet8x4")
    block = model.stages[2][-1]
    seen = {}
    handle = block.relu.register_forward_hook(lambda _m, inp, _out: seen.update(pre=inp[0]))
    try:
        with torch.no_grad():
            h = model.stem(torch.randn(2, 3, 32, 32))
            for stage in model.stages:
                h = stage(h)
    finally:
        handle.remove()
    assert (seen["pre"] < 0).any()
    torch.testing.assert_close(h, seen["pre"].clamp_min(0))


def test_wrn_final_bn_relu_is_in_head_pre():
    model = _model("wrn_40_2")
    assert isinstance(model.head.pre.bn, nn.BatchNorm2d)
    assert isinstance(model.head.pre.relu, nn.ReLU)
    with torch.no_grad():
        h = model.stem(torch.randn(2, 3, 16, 16))
        for stage in model.stages:
            h = stage(h)
    assert (h < 0).any()  # stage outputs are raw block sums


@pytest.mark.parametrize("name", ["mobile_half", "ShuffleV2"])
def test_final_1x1_conv_is_in_head_pre(name):
    pre = _model(name).head.pre
    assert isinstance(pre.conv, nn.Conv2d) and pre.conv.kernel_size == (1, 1)
    assert isinstance(pre.bn, nn.BatchNorm2d)
    assert isinstance(pre.relu, nn.ReLU)


def test_wrn_dropout_is_off_by_default_and_optional():
    assert not any(isinstance(m, nn.Dropout) for m in _model("wrn_16_2").modules())
    model = build("wrn_16_2", dropout=0.3)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())
    assert _n_params(model) == PARAMS["wrn_16_2"]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownNameError, match=r"did you mean 'resnet8x4'"):
        build("resnet8x5")


@pytest.mark.parametrize(("name", "width", "widths"), [("resnet8", 0.5, (8, 8, 16, 32)),
                                                       ("resnet20", 0.25, (4, 4, 8, 16)),
                                                       ("resnet8x4", 0.5, (16, 32, 64, 128))])
def test_a_cifar_resnet_at_a_fraction_of_its_width(name, width, widths):
    """`width` scales every stage: the count follows the formula at the scaled widths, the roles and the forward
    follow, and width 1 is the zoo model itself."""
    depth = int(name[len("resnet"):].partition("x")[0])
    model = build(name, num_classes=100, width=width)
    assert _n_params(model) == _resnet_cifar(depth, widths, 100) < PARAMS[name]
    assert model.stage_channels == list(widths[1:])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert _n_params(build(name, num_classes=100, width=1.0)) == PARAMS[name]
    with pytest.raises(ValueError, match="width must be in"):
        build(name, num_classes=100, width=0)
