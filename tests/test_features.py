import pytest
import torch
from torch import nn

from distillab import models
from distillab.errors import UnknownNameError
from distillab.features import FeatureTap, feature_shapes
from distillab.roles import roles


def test_tap_on_plain_sequential_reads_outputs_and_inputs():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with FeatureTap(net, ["0", "1", "2:input"]) as tap:
        out = net(x)
        hidden = net[0](x)
        assert torch.equal(tap["0"], hidden)
        assert torch.equal(tap["1"], hidden.relu())
        assert torch.equal(tap["2:input"], hidden.relu())
    assert out.shape == (5, 2)


def test_tap_hooks_are_removed_on_exit():
    net = nn.Sequential(nn.Linear(4, 3))
    with FeatureTap(net, ["0"]):
        assert len(net[0]._forward_hooks) == 1
    assert len(net[0]._forward_hooks) == 0


def test_tap_on_zoo_model_gives_stage_maps_and_logits():
    model = models.build("resnet8x4", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    info = roles(model)
    with FeatureTap(model, [*info.stage_names, info.pooled, "head.fc"]) as tap:
        logits = model(x)
    assert [tuple(tap[n].shape[1:]) for n in info.stage_names] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert tap[info.pooled].shape == (2, 256)
    assert torch.equal(tap["head.fc"], logits)


def test_unknown_module_name_suggests_the_closest():
    model = models.build("resnet20", num_classes=10)
    with pytest.raises(UnknownNameError, match=r"did you mean 'stages\.1'"):
        FeatureTap(model, ["stage.1"])


def test_reading_before_forward_is_a_clear_error():
    net = nn.Sequential(nn.Linear(4, 3))
    with FeatureTap(net, ["0"]) as tap, pytest.raises(KeyError, match="forward pass first"):
        tap["0"]


def test_feature_shapes_by_dry_run_keeps_training_mode():
    model = models.build("wrn_16_2", num_classes=10, in_channels=1)
    model.train()
    shapes = feature_shapes(model, roles(model).stage_names, (1, 28, 28))
    assert shapes["stages.2"][0] == 128
    assert model.training
