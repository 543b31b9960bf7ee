"""Loss values on fixed tensors against hand computations."""

import math

import torch

from distillab.losses import kd_loss


def test_kd_loss_two_classes_temperature_one():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert math.isclose(kd_loss(s, t, 1.0).item(), expected, rel_tol=1e-6)


def test_kd_loss_is_scaled_by_t_squared():
    # T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1), p_s uniform; KL = sum p ln(2p); loss = 4 KL
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    r3 = math.sqrt(3.0)
    p = (r3 / (r3 + 1), 1 / (r3 + 1))
    expected = 4 * sum(q * math.log(2 * q) for q in p)
    assert math.isclose(kd_loss(s, t, 2.0).item(), expected, rel_tol=1e-6)


def test_kd_loss_averages_over_the_batch_not_the_classes():
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    # sample 1: p_t = (1/2, 1/4, 1/4) vs uniform thirds; sample 2: identical -> 0
    kl1 = 0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75)
    assert math.isclose(kd_loss(s, t, 1.0).item(), kl1 / 2, rel_tol=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_has_gradient_only_for_the_student():
    s = torch.randn(4, 5, requires_grad=True)
    t = s.detach().clone()
    loss = kd_loss(s, t, 4.0)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert s.grad is not None
