"""Loss values on fixed tensors against hand computations."""

import math

import numpy as np
import pytest
import torch

from distillab.losses import (
    MLKD_TEMPERATURES,
    at_loss,
    at_most_median,
    attention_map,
    batch_correlation_loss,
    class_correlation_loss,
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    gaussian_kl,
    hcl_level,
    hcl_loss,
    kd_loss,
    match_spatial,
    mlkd_terms,
    nce_loss,
    pearson_rows,
    warmup_factor,
)

# fixed logits, B = 3 samples x C = 4 classes, and labels; the references below are numpy (float64)
S = [[0.5, -1.0, 2.0, 0.0], [1.5, 0.3, -0.7, 0.2], [-0.4, 0.9, 0.1, 1.2]]
T = [[2.0, 0.0, 1.0, -1.0], [0.1, 2.5, -0.3, 0.4], [-1.0, 0.2, 0.0, 3.0]]
LABELS = [2, 1, 3]


def softmax(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p, q):
    """KL(p || q) of two probability vectors."""
    return float(sum(a * math.log(a / b) for a, b in zip(p, q, strict=True)))


def close(value, expected, rel=1e-5, atol=1e-7):
    return value == pytest.approx(expected, rel=rel, abs=atol)


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


def test_kd_loss_is_zero_with_zero_gradient_for_equal_logits():
    s = torch.randn(4, 5, requires_grad=True)
    t = s.detach().clone()
    loss = kd_loss(s, t, 4.0)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert s.grad.abs().max().item() < 1e-6  # KL's minimum: the student is not pushed anywhere


def test_kd_loss_gradient_is_t_times_the_probability_gap_over_the_batch():
    # d/dz_s [T^2 KL(p_t || softmax(z_s / T)) / B] = T (p_s - p_t) / B
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T)
    kd_loss(s, t, 2.0).backward()
    expected = 2.0 * (softmax(S, 2.0) - softmax(T, 2.0)) / len(S)
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------- DKD
def dkd_reference(s, t, labels, temperature):
    """TCKD and NCKD from their definitions: KL of the (target, rest) split, and KL of the softmax over the
    non-target classes alone (the target class deleted, not masked), each T^2 times the batch mean."""
    p_s, p_t = softmax(s, temperature), softmax(t, temperature)
    tckd, nckd = [], []
    for i, label in enumerate(labels):
        tckd.append(kl([p_t[i, label], 1 - p_t[i, label]], [p_s[i, label], 1 - p_s[i, label]]))
        q_s = softmax([np.delete(np.asarray(s[i], dtype=np.float64), label)], temperature)[0]
        q_t = softmax([np.delete(np.asarray(t[i], dtype=np.float64), label)], temperature)[0]
        nckd.append(kl(q_t, q_s))
    return temperature**2 * np.mean(tckd), temperature**2 * np.mean(nckd)


def test_dkd_terms_two_classes_of_three_by_hand():
    # p_t = (4, 3, 1) / 8, target 0: TCKD = KL((1/2, 1/2) || (1/3, 2/3)); non-target (3/4, 1/4) vs (1/2, 1/2)
    s = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([[math.log(4.0), math.log(3.0), 0.0]])
    tckd, nckd = dkd_terms(s, t, torch.tensor([0]), 1.0)
    assert close(tckd.item(), 0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    assert close(nckd.item(), 0.75 * math.log(1.5) + 0.25 * math.log(0.5))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_match_their_definitions(temperature):
    tckd, nckd = dkd_terms(torch.tensor(S), torch.tensor(T), torch.tensor(LABELS), temperature)
    want_tckd, want_nckd = dkd_reference(S, T, LABELS, temperature)
    assert close(tckd.item(), want_tckd) and close(nckd.item(), want_nckd)


def test_dkd_loss_weights_the_two_terms():
    want_tckd, want_nckd = dkd_reference(S, T, LABELS, 4.0)
    loss = dkd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(LABELS), alpha=1.5, beta=8.0, temperature=4.0)
    assert close(loss.item(), 1.5 * want_tckd + 8.0 * want_nckd)


@pytest.mark.parametrize(("epoch", "warmup", "expected"), [
    (0, 5, 0.2), (3, 5, 0.8), (4, 5, 1.0), (9, 5, 1.0), (0, 1, 1.0), (7, 0, 1.0), (2, -1, 1.0)])
def test_warmup_factor_is_epochs_so_far_over_the_warmup_capped_at_one(epoch, warmup, expected):
    assert warmup_factor(epoch, warmup) == pytest.approx(expected)
    if warmup > 0:  # a tensor epoch gives the same factor, as a tensor
        factor = warmup_factor(torch.tensor(epoch), warmup)
        assert isinstance(factor, torch.Tensor) and factor.item() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------------ DIST
def test_pearson_rows_by_hand():
    # row 1: b = 2a, correlation 1; row 2: centred (2, -1, -1)/3 and (-1, 2, -1)/3: (-3/9) / (6/9) = -1/2
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(pearson_rows(a, b), torch.tensor([1.0, -0.5]), atol=1e-6)


def dist_reference(s, t, tau):
    y_s, y_t = softmax(s, tau), softmax(t, tau)
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(len(y_s))])
    intra = 1 - np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(y_s.shape[1])])
    return tau**2 * inter, tau**2 * intra


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_terms_are_one_minus_the_mean_row_and_column_correlations(tau):
    inter, intra = dist_terms(torch.tensor(S), torch.tensor(T), tau)
    want_inter, want_intra = dist_reference(S, T, tau)
    assert close(inter.item(), want_inter, rel=1e-4, atol=1e-6) and close(intra.item(), want_intra, rel=1e-4, atol=1e-6)


def test_dist_loss_weights_inter_by_beta_and_intra_by_gamma():
    want_inter, want_intra = dist_reference(S, T, 2.0)
    loss = dist_loss(torch.tensor(S), torch.tensor(T), tau=2.0, beta=3.0, gamma=0.5)
    assert close(loss.item(), 3.0 * want_inter + 0.5 * want_intra, rel=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ MLKD
def gram_gap(p_s, p_t, axis):
    """sum of squared entries of G_t - G_s, G the C x C (axis 0: P^T P) or B x B (axis 1: P P^T) gram matrix."""
    n = p_s.shape[1 - axis]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if axis == 0:
                g_t, g_s = sum(p_t[:, i] * p_t[:, j]), sum(p_s[:, i] * p_s[:, j])
            else:
                g_t, g_s = sum(p_t[i] * p_t[j]), sum(p_s[i] * p_s[j])
            total += (g_t - g_s) ** 2
    return total


def test_class_correlation_loss_is_the_class_gram_gap_over_the_classes():
    p_s, p_t = softmax(S, 3.0), softmax(T, 3.0)
    loss = class_correlation_loss(torch.tensor(S), torch.tensor(T), 3.0)
    assert close(loss.item(), gram_gap(p_s, p_t, axis=0) / 4)


def test_batch_correlation_loss_is_the_sample_gram_gap_over_the_batch():
    p_s, p_t = softmax(S, 3.0), softmax(T, 3.0)
    loss = batch_correlation_loss(torch.tensor(S), torch.tensor(T), 3.0)
    assert close(loss.item(), gram_gap(p_s, p_t, axis=1) / 3)


@pytest.mark.parametrize(("values", "expected"), [
    ([3.0, 1.0, 2.0, 10.0], 0.5),     # median 2.5 (interpolated): 1 and 2
    ([5.0, 1.0, 3.0], 2 / 3),         # median 3: 1 and 3
    ([2.0, 2.0, 2.0, 7.0], 0.75),     # ties at the median count
])
def test_at_most_median_is_the_fraction_at_or_below_the_median(values, expected):
    assert np.mean(np.asarray(values) <= np.percentile(values, 50)) == pytest.approx(expected)  # the reference
    assert at_most_median(torch.tensor(values)).item() == pytest.approx(expected)


def kd_reference(s, t, temperature):
    p_s, p_t = softmax(s, temperature), softmax(t, temperature)
    return temperature**2 * np.mean([kl(p_t[i], p_s[i]) for i in range(len(p_s))])


@pytest.mark.parametrize("quirk", [True, False])
def test_mlkd_terms_from_their_definitions(quirk):
    weak_s, weak_t = S, T
    strong_s = [[x * 0.5 + 0.1 for x in row] for row in S]
    strong_t = [[x * -0.8 for x in row] for row in T]
    p_t = softmax(weak_t)
    confidence, class_mass = p_t.max(axis=1), p_t.sum(axis=0)
    sample_scale = np.mean(confidence <= np.percentile(confidence, 50))
    class_scale = np.mean(class_mass <= np.percentile(class_mass, 50))
    kd_weak = sum(kd_reference(weak_s, weak_t, tt) for tt in MLKD_TEMPERATURES)
    kd_strong = sum(kd_reference(weak_s, weak_t, tt) if quirk and tt in (2.0, 6.0) else
                    kd_reference(strong_s, strong_t, tt) for tt in MLKD_TEMPERATURES)
    cc = sum(gram_gap(softmax(weak_s, tt), softmax(weak_t, tt), axis=0) / 4 for tt in MLKD_TEMPERATURES)
    bc = sum(gram_gap(softmax(weak_s, tt), softmax(weak_t, tt), axis=1) / 3 for tt in MLKD_TEMPERATURES)
    terms = mlkd_terms(*(torch.tensor(x) for x in (weak_s, weak_t, strong_s, strong_t)), quirk=quirk)
    assert set(terms) == {"kd", "cc", "bc"}
    assert close(terms["kd"].item(), sample_scale * kd_weak + kd_strong)
    assert close(terms["cc"].item(), class_scale * cc)
    assert close(terms["bc"].item(), sample_scale * bc)


# ---------------------------------------------------------------------------------------------------- feature maps
def block_mean(x, out_h, out_w):
    """Average-pool a ... x H x W numpy array by whole blocks to out_h x out_w."""
    *lead, h, w = x.shape
    return x.reshape(*lead, out_h, h // out_h, out_w, w // out_w).mean(axis=(-3, -1))


def test_match_spatial_pools_each_axis_to_the_smaller_size():
    grid = torch.arange(16.0).reshape(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    small = torch.zeros(1, 1, 2, 2)
    a, b = match_spatial(grid, small)
    assert a.tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]] and b is small
    tall = torch.arange(8.0).reshape(1, 1, 4, 2)  # H 4 -> 2: rows (0, 1)+(2, 3), (4, 5)+(6, 7)
    wide = torch.arange(8.0).reshape(1, 1, 2, 4)  # W 4 -> 2: (0, 1), (2, 3) / (4, 5), (6, 7)
    a, b = match_spatial(tall, wide)
    assert a.tolist() == [[[[1.0, 2.0], [5.0, 6.0]]]] and b.tolist() == [[[[0.5, 2.5], [4.5, 6.5]]]]


FEATURE = np.array([[[[1.0, -2.0], [0.5, 3.0]], [[0.0, 1.0], [-1.0, 2.0]]]])  # 1 x 2 x 2 x 2


def attention_reference(feature, p=2.0):
    a = (feature**p).mean(axis=1).reshape(len(feature), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_attention_map_is_the_normalised_channel_mean_of_the_powered_feature():
    # channel means of F^2: (1 + 0) / 2, (4 + 1) / 2, (0.25 + 1) / 2, (9 + 4) / 2 = 0.5, 2.5, 0.625, 6.5
    a = np.array([0.5, 2.5, 0.625, 6.5])
    expected = a / math.sqrt(sum(a**2))
    np.testing.assert_allclose(attention_map(torch.tensor(FEATURE, dtype=torch.float32))[0].numpy(), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(attention_map(torch.tensor(FEATURE, dtype=torch.float32), p=4.0).numpy(),
                               attention_reference(FEATURE, 4.0), rtol=1e-6)


def test_at_loss_is_the_mean_squared_attention_gap_with_the_larger_map_pooled():
    rng = np.random.default_rng(0)
    f_s, f_t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))
    expected = np.mean((attention_reference(f_s) - attention_reference(f_t)) ** 2)
    assert close(at_loss(torch.tensor(f_s, dtype=torch.float32), torch.tensor(f_t, dtype=torch.float32)).item(),
                 expected, rel=1e-5)
    f_t_small = rng.normal(size=(2, 5, 2, 2))
    expected = np.mean((attention_reference(block_mean(f_s, 2, 2)) - attention_reference(f_t_small)) ** 2)
    loss = at_loss(torch.tensor(f_s, dtype=torch.float32), torch.tensor(f_t_small, dtype=torch.float32))
    assert close(loss.item(), expected, rel=1e-5)


def hcl_reference(f_s, f_t):
    """Full-size MSE, weight 1; then each pooled size (4, 2, 1) smaller than the map, at half the last weight."""
    losses, weights, weight = [np.mean((f_s - f_t) ** 2)], [1.0], 1.0
    for size in (4, 2, 1):
        if size < f_s.shape[2]:
            weight /= 2
            losses.append(np.mean((block_mean(f_s, size, size) - block_mean(f_t, size, size)) ** 2))
            weights.append(weight)
    return sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)


def test_hcl_level_by_hand_on_a_2x2_map():
    # sizes 4 and 2 are not smaller than the map: full MSE (weight 1) and the 1x1 means' (weight 1/2)
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f_t = torch.zeros(1, 1, 2, 2)
    full, pooled = (1 + 4 + 9 + 16) / 4, 2.5**2
    assert close(hcl_level(f_s, f_t).item(), (full + 0.5 * pooled) / 1.5)


def test_hcl_level_weights_the_pooled_sizes_by_halves():
    rng = np.random.default_rng(1)
    f_s, f_t = rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 3, 8, 8))  # sizes 4, 2, 1: weights 1/2, 1/4, 1/8
    loss = hcl_level(torch.tensor(f_s, dtype=torch.float32), torch.tensor(f_t, dtype=torch.float32))
    assert close(loss.item(), hcl_reference(f_s, f_t))


def test_hcl_loss_sums_the_levels():
    rng = np.random.default_rng(2)
    pairs = [(rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))),
             (rng.normal(size=(2, 6, 2, 2)), rng.normal(size=(2, 6, 2, 2)))]
    loss = hcl_loss([torch.tensor(s, dtype=torch.float32) for s, _ in pairs],
                    [torch.tensor(t, dtype=torch.float32) for _, t in pairs])
    assert close(loss.item(), sum(hcl_reference(s, t) for s, t in pairs))


# ------------------------------------------------------------------------------------ distributions and contrast
def test_gaussian_kl_by_hand():
    # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, e^2) || N(0, 1)) = (e^2 - 1 - 2) / 2; sum over the two dimensions
    mean_p, log_var_p = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    zeros = torch.zeros(1, 2)
    assert close(gaussian_kl(mean_p, log_var_p, zeros, zeros).item(), 0.5 + (math.exp(2) - 3) / 2)


def test_gaussian_kl_matches_the_closed_form_and_averages_over_the_batch():
    mu_p, lv_p = np.array([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]]), np.array([[0.1, -0.5, 0.0], [1.0, 0.2, -1.5]])
    mu_q, lv_q = np.array([[0.0, 1.0, 1.5], [0.4, -0.3, 0.0]]), np.array([[0.0, 0.3, -0.2], [0.5, -1.0, 0.7]])
    var_p, var_q = np.exp(lv_p), np.exp(lv_q)
    per_sample = 0.5 * (np.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1).sum(axis=1)
    args = (torch.tensor(x, dtype=torch.float32) for x in (mu_p, lv_p, mu_q, lv_q))
    assert close(gaussian_kl(*args).item(), per_sample.mean())


def test_nce_loss_by_hand():
    scores = [[0.6, 0.1, 0.3], [0.2, 0.05, 0.9]]  # B = 2, column 0 the positive, K = 2 negatives
    num_data, eps = 20, 1e-7
    noise = 2 / num_data
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + noise + eps))
        total += sum(math.log(noise / (x + noise + eps)) for x in row[1:])
    assert close(nce_loss(torch.tensor(scores), num_data).item(), -total / 2)
