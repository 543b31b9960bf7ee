"""The frozen teacher's BatchNorms folded into its convs: same logits and tapped features, fewer layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import teacher_changes, tiny_config
from distillab import methods, models
from distillab.engine.teacher_fold import fold_batchnorm, fold_frozen_teacher, foldable_pairs, same_outputs
from distillab.features import FeatureTap
from distillab.roles import roles

SHAPE = (3, 32, 32)


def teacher(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = models.build(name, num_classes=10, in_channels=3, **kwargs)
    with torch.no_grad():  # statistics and affine parameters away from their identity start
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def role_taps(model: nn.Module) -> list[str]:
    info = roles(model)
    return [*info.stage_names, *(p for p in info.stage_preacts if p), info.pooled,
            *([info.prepool_preact] if info.prepool_preact else [])]


@pytest.mark.parametrize("name", ["resnet8", "ResNet18", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1",
                                  "ShuffleV2", "vit_tiny"])
def test_every_zoo_family_folds_with_the_same_logits_and_role_features(name):
    model = teacher(name, **({"conv_stem": True} if name == "vit_tiny" else {}))
    taps = role_taps(model)
    folded, count = fold_frozen_teacher(model, SHAPE, taps)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert count > 0 and left == bns - count  # wrn: only the BNs right after a conv fold (its blocks are pre-act)
    x = torch.randn(5, *SHAPE)
    with torch.no_grad(), FeatureTap(model, taps) as a, FeatureTap(folded, taps) as b:
        expected, got = model(x), folded(x)
        assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max())
        for u, v in zip(a.values(), b.values(), strict=True):
            assert torch.allclose(v, u, atol=1e-5 * max(u.abs().max(), 1.0))


def test_a_tapped_bn_input_or_conv_output_is_not_folded_and_a_tapped_bn_output_is():
    model = teacher("resnet8")
    all_pairs = foldable_pairs(model, SHAPE)
    assert ("stages.0.0.conv1", "stages.0.0.bn1") in all_pairs
    kept = foldable_pairs(model, SHAPE, ["stages.0.0.bn1:input", "stages.1.0.conv2"])
    assert ("stages.0.0.conv1", "stages.0.0.bn1") not in kept and ("stages.1.0.conv2", "stages.1.0.bn2") not in kept
    assert len(kept) == len(all_pairs) - 2
    assert ("stages.2.0.conv1", "stages.2.0.bn1") in foldable_pairs(model, SHAPE, ["stages.2.0.bn1"])
    folded = fold_batchnorm(model, all_pairs)
    assert isinstance(folded.get_submodule("stages.0.0.bn1"), nn.Identity)
    assert same_outputs(model, folded, SHAPE, ["stages.0.0.bn1", "stages.2.0.relu:input"])


def test_a_fold_that_would_change_the_outputs_is_refused():
    class Shared(nn.Module):  # the conv's output goes to the BN and, by a functional op, to the output too
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            return self.fc((self.bn(h) + h).mean((2, 3)))

    model = Shared().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(4.0)
    assert foldable_pairs(model, SHAPE) == [("conv", "bn")]  # the functional read is invisible to the hooks...
    folded, count = fold_frozen_teacher(model, SHAPE)
    assert count == 0 and folded is model  # ...but the check on a batch refuses it


def test_a_method_with_a_folded_teacher_computes_the_same_terms_and_its_taps_follow():
    student, model = models.build("resnet8", 10, 3), teacher("resnet20")
    torch.manual_seed(1)
    method = methods.build("fitnet", copy.deepcopy(student), copy.deepcopy(model), input_shape=SHAPE).eval()
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    with torch.no_grad():
        _, before = method(x, y)
        folded, count = fold_frozen_teacher(method.teacher, SHAPE, method.teacher_tap.names)
        method.replace_teacher(folded)
        _, after = method(x, y)
    assert count > 0 and method.teacher is folded
    assert after["hint"].item() == pytest.approx(before["hint"].item(), rel=1e-5)


def test_training_with_a_folded_teacher_records_how_many_bns_folded(tmp_path, untrained_digits_teacher):
    from distillab.cli import main

    config = tiny_config(tmp_path, "folded", *teacher_changes(untrained_digits_teacher, "resnet8"),
                         "method.name=fitnet", "train.fold_teacher_bn=true")
    assert main(["train", str(config)]) == 0
    import json

    summary = json.loads((tmp_path / "runs" / "folded" / "summary.json").read_text())
    assert summary["teacher_bn_folded"] == 9  # resnet8: the stem's, 3 blocks x 2 and the 2 shortcuts' BNs
