"""Feature roles: the zoo's static declarations agree with a forward pass, and methods work from roles alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillab import methods, models
from distillab.errors import ConfigError
from distillab.features import feature_shapes
from distillab.methods.capabilities import needs_indices
from distillab.roles import FeatureInfo, StageInfo, roles


@pytest.mark.parametrize("name", models.available())
def test_declared_roles_match_a_forward_pass(name):
    model = models.build(name, num_classes=10).eval()
    info = roles(model)
    size = model.input_size
    names = [n for s in info.stages for n in (s.name, *s.blocks, *filter(None, (*s.block_preacts, s.preact)))]
    shapes = feature_shapes(model, [*names, info.prepool, info.pooled], size)
    for stage in info.stages:
        c, h, _ = shapes[stage.name]
        assert c == stage.channels and h == -(-size[1] // stage.reduction), (stage, shapes[stage.name])
        assert shapes[stage.blocks[-1]] == shapes[stage.name]
        for block, preact in zip(stage.blocks, stage.block_preacts, strict=True):
            assert preact is None or shapes[preact] == shapes[block]  # a pre-activation is the whole block output
    assert shapes[info.pooled] == (info.channels,) and shapes[info.prepool][0] == info.channels
    if info.last_conv is not None:
        assert isinstance(model.get_submodule(info.last_conv), nn.Conv2d)


@pytest.mark.parametrize(("name", "preacts", "next_preact0", "prepool_preact", "last_conv"), [
    ("resnet8", ["stages.0.0.relu:input", "stages.1.0.relu:input", "stages.2.0.relu:input"],
     "stages.0.0.relu:input", "stages.2.0.relu:input", "stages.2.0.conv2"),
    ("wrn_16_2", [None, None, None], "stages.1.0.relu1:input", None, "stages.2.1.conv2"),
    ("ShuffleV2", [None, None, None], None, "head.pre.relu:input", "head.pre.conv"),  # half-width ReLUs
    ("mobile_half", [None] * 4, None, "head.pre.relu:input", "head.pre.conv"),  # linear bottlenecks
    ("vit_tiny", [None] * 3, None, None, None),
])
def test_pre_activation_points_follow_the_block_design(name, preacts, next_preact0, prepool_preact, last_conv):
    info = roles(models.build(name, num_classes=10))
    assert [s.preact for s in info.stages] == preacts
    assert info.stages[0].next_preact == next_preact0
    assert (info.prepool_preact, info.last_conv) == (prepool_preact, last_conv)
    assert info.stage_preacts == [p or s.name for p, s in zip(preacts, info.stages, strict=True)]


class Outside(nn.Module):
    """Not a zoo model: names of its own, and roles it carries as a `feature_info` attribute."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def outside(width: int, with_roles: bool = True) -> Outside:
    model = Outside(width)
    if with_roles:
        stages = (StageInfo("features.1", width, 1, ("features.1",), (None,), None, None),
                  StageInfo("features.3", 2 * width, 2, ("features.3",), (None,), None, None))
        model.feature_info = FeatureInfo(stages, "features", None, "pool", 2 * width, "features.2")
    return model


@pytest.mark.parametrize("method", ["fitnet", "at", "crd", "diffkd", "rkd", "sp", "vid", "reviewkd"])
def test_methods_find_an_outside_models_features_by_role(method):
    options = {"num_negatives": 8, "feat_dim": 8} if method == "crd" else {}
    built = methods.build(method, outside(4), outside(8), input_shape=(1, 8, 8), **options)
    if needs_indices(built):
        built.bind_train_set(torch.arange(32) % 10)
        args = (torch.arange(4),)
    else:
        args = ()
    logits, terms = built(torch.randn(4, 1, 8, 8), torch.arange(4), *args)
    assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in terms.values())


def test_a_model_without_roles_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match=r"Outside declares no feature roles .*set method\.options\.student_layer"):
        methods.build("fitnet", outside(4, with_roles=False), outside(8), input_shape=(1, 8, 8))
    plain = methods.build("fitnet", outside(4, with_roles=False), outside(8, with_roles=False), input_shape=(1, 8, 8),
                          student_layer="features.3", teacher_layer="features.3")
    assert plain(torch.randn(2, 1, 8, 8), torch.arange(2))[0].shape == (2, 10)  # named modules need no roles
