import math

import pytest
import torch
import torch.nn.functional as F

from distillab import methods, models
from distillab.errors import ConfigError, UnknownNameError
from distillab.losses import kd_loss
from distillab.methods.fitnet import ConvReg


@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = models.build("resnet20", num_classes=10, in_channels=1)
    student = models.build("resnet8", num_classes=10, in_channels=1)
    return teacher, student


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_registry_lists_the_foundation_methods():
    assert {"ce", "kd", "fitnet"} <= set(methods.available())


def test_unknown_method_suggests_the_closest(pair):
    with pytest.raises(UnknownNameError, match="did you mean 'fitnet'"):
        methods.build("fitnets", pair[1], pair[0])


def test_misspelt_option_is_named(pair):
    teacher, student = pair
    with pytest.raises(ConfigError, match=r"method\.options\.temprature: unknown key; did you mean 'temperature'"):
        methods.build("kd", student, teacher, temprature=3)


def test_impossible_option_value_is_named(pair):
    teacher, student = pair
    with pytest.raises(ConfigError, match=r"method\.options\.temperature"):
        methods.build("kd", student, teacher, temperature=-1)


def test_kd_needs_a_teacher(pair):
    with pytest.raises(ConfigError, match="needs a teacher"):
        methods.build("kd", pair[1], None)


def test_teacher_is_frozen_and_stays_in_eval_mode(pair):
    teacher, student = pair
    method = methods.build("kd", student, teacher)
    method.train()
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(n.startswith("teacher.") for n in method.trainable_state_dict())


def test_kd_terms_are_weighted_per_the_spec(pair):
    teacher, student = pair
    method = methods.build("kd", student, teacher)
    x, y = batch()
    method.eval()  # deterministic BN for recomputation
    logits, terms = method(x, y)
    assert set(terms) == {"ce", "kd"}
    with torch.no_grad():
        t_logits = teacher(x)
    assert torch.allclose(terms["ce"], 0.1 * F.cross_entropy(logits, y))
    assert torch.allclose(terms["kd"], 0.9 * kd_loss(logits, t_logits, 4.0))


def test_ce_ignores_the_teacher_and_has_one_term(pair):
    teacher, student = pair
    method = methods.build("ce", student, teacher)
    assert method.teacher is None
    logits, terms = method(*batch())
    assert set(terms) == {"ce"} and logits.shape == (4, 10)


def test_fitnet_hint_on_stage_two_reaches_regressor_not_teacher(pair):
    teacher, student = pair
    method = methods.build("fitnet", student, teacher, input_shape=(1, 28, 28))
    _, terms = method(*batch())
    assert set(terms) == {"ce", "hint"}
    terms["hint"].backward()
    assert all(p.grad is not None for p in method.regressor.parameters())
    assert student.stages[0][0].conv1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert method.side_parameter_count() == sum(p.numel() for p in method.regressor.parameters())


def test_close_unhooks_the_deployed_student(pair):
    teacher, student = pair
    method = methods.build("fitnet", student, teacher, input_shape=(1, 28, 28))
    method(*batch())
    hooked = [m for m in [*student.modules(), *teacher.modules()] if m._forward_hooks]
    assert hooked  # the hint taps
    method.close()
    assert not any(m._forward_hooks for m in hooked)
    deployed = method.deploy()
    with torch.no_grad():
        deployed(batch()[0])
    assert all(not tap._values for tap in method._taps)  # nothing recorded any more


def test_fitnet_hint_equals_weighted_mse_of_regressed_student_feature(pair):
    teacher, student = pair
    method = methods.build("fitnet", student, teacher, input_shape=(1, 28, 28), hint_weight=2.0).eval()
    x, y = batch()
    _, terms = method(x, y)
    with torch.no_grad():
        f_s = student.stages[1](student.stages[0](student.stem(x)))
        f_t = teacher.stages[1](teacher.stages[0](teacher.stem(x)))
        expected = 2.0 * ((method.regressor(f_s) - f_t) ** 2).mean()
    assert math.isclose(terms["hint"].item(), expected.item(), rel_tol=1e-5)


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((64, 16, 16), (128, 8, 8)), ((32, 8, 8), (64, 16, 16)), ((16, 16, 16), (32, 16, 16)), ((8, 6, 6), (8, 4, 4))],
)
def test_convreg_maps_student_shape_to_teacher_shape(s_shape, t_shape):
    reg = ConvReg(s_shape, t_shape)
    assert reg(torch.randn(2, *s_shape)).shape == (2, *t_shape)


def test_convreg_refuses_an_upsampling_it_cannot_do():
    with pytest.raises(ConfigError, match="cannot regress"):
        ConvReg((8, 4, 4), (8, 12, 12))
