"""KR (reconstructed, spec shared/methods/kr.md §8): sparse recoding penalty, aggregation, weight-space prior."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from conftest import teacher_changes, tiny_run
from distillab import methods, models
from distillab.errors import ConfigError
from distillab.losses import kd_loss
from distillab.methods.kr import (
    deadzone_residual_loss,
    moments_prior,
    quantile_prior,
    quantile_targets,
    sparse_gradient,
    topk_residual_loss,
)
from distillab.run import train_run

SHAPE = (1, 16, 16)  # stages at 16, 8 and 4 pixels: enough for every property, cheap on a shared CPU


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: one thread is as fast, and avoids OpenMP threads waiting on each other on a busy
    shared CPU (conftest's two threads made these tests ~50x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nets(teacher="resnet20", student="resnet8", seed=0):
    torch.manual_seed(seed)
    t = models.build(teacher, num_classes=10, in_channels=1)
    torch.manual_seed(seed + 1)
    return t, models.build(student, num_classes=10, in_channels=1)


def kr(teacher, student, **options):
    return methods.build("kr", student, teacher, input_shape=SHAPE, **options)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def stage_outputs(model, x):
    h, outs = model.stem(x), []
    for stage in model.stages:
        h = stage(h)
        outs.append(h)
    return outs


def scaled_stage_weights(model, stage):
    convs = [m for m in model.stages[stage].modules() if isinstance(m, torch.nn.Conv2d)]
    return torch.cat([c.weight.flatten() * math.sqrt(c.weight[0].numel()) for c in convs]).detach()


# ----------------------------------------------------------------------------------- reading A: features
def test_full_keep_equals_the_sum_of_plain_mse_hints():
    teacher, student = nets()
    method = kr(teacher, student, rho=1.0, kr_weight=1.0).eval()
    x, y = batch()
    _, terms = method(x, y)
    with torch.no_grad():
        expected = sum(F.mse_loss(reg(s), t) for reg, s, t in
                       zip(method.regressors, stage_outputs(student, x), stage_outputs(teacher, x), strict=True))
    assert math.isclose(terms["kr"].item(), expected.item(), rel_tol=1e-6)


def test_topk_on_a_fixed_tensor():
    residual = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.1, -4.0, 1.0, 0.0]])
    # per sample the 2 largest |R|: {3, 2} and {-4, 1}: (9 + 4 + 16 + 1) / 4
    assert topk_residual_loss(residual, 0.5).item() == pytest.approx(7.5)


def test_topk_gradient_reaches_exactly_the_kept_entries_of_each_sample():
    residual = torch.randn(3, 2, 3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    topk_residual_loss(residual, 0.1).backward()  # ceil(0.1 * 30) = 3 per sample
    grad, flat = residual.grad.flatten(1), residual.detach().flatten(1)
    for g, r in zip(grad, flat, strict=True):
        kept = g.nonzero().flatten()
        assert set(kept.tolist()) == set(r.abs().topk(3).indices.tolist())
        # d/dR of sum(M R^2) / sum(M) with the mask held fixed (no gradient through the detached mask)
        assert torch.allclose(g[kept], 2 * r[kept] / 9)


def test_topk_of_equal_residuals_is_their_square_for_any_rho():
    for rho in (0.01, 0.25, 0.5, 1.0):
        assert topk_residual_loss(torch.full((2, 4, 3, 3), -1.5), rho).item() == pytest.approx(2.25)


def test_deadzone_on_a_fixed_tensor_and_its_gradient():
    residual = torch.tensor([[3.0, -1.0, 0.2, 0.5, -0.4, 2.0], [3.0, -1.0, 0.2, 0.5, -0.4, 2.0]], requires_grad=True)
    target = torch.tensor([[1.0] * 6, [2.0] * 6])  # RMS 1 and 2, so tau = 0.5 and 1.0
    loss = deadzone_residual_loss(residual, target, 0.5)
    # sample 1: relu(|R| - 0.5) = 2.5, 0.5, 0, 0, 0, 1.5; sample 2: relu(|R| - 1) = 2, 0, 0, 0, 0, 1
    assert loss.item() == pytest.approx((6.25 + 0.25 + 2.25 + 4 + 1) / 12)
    loss.backward()
    expected = torch.tensor([[2.5, -0.5, 0, 0, 0, 1.5], [2.0, 0, 0, 0, 0, 1.0]]) * 2 / 12
    assert torch.allclose(residual.grad, expected)
    assert (residual.grad[0, 2:5] == 0).all() and residual.grad[1, 1] == 0  # |R| <= tau: exactly zero


@pytest.mark.parametrize("aggregate", ["last", "mean"])
def test_teacher_target_aggregates_the_stage_block_outputs(aggregate):
    teacher, student = nets()
    method = kr(teacher, student, aggregate=aggregate).eval()
    x, _ = batch()
    method.teacher_forward(x)
    targets = method.teacher_targets()
    with torch.no_grad():
        h = teacher.stem(x)
        for stage, target in zip(teacher.stages, targets, strict=True):
            blocks = []
            for block in stage:
                h = block(h)
                blocks.append(h)
            expected = blocks[-1] if aggregate == "last" else sum(blocks) / len(blocks)
            assert torch.allclose(target, expected, atol=1e-6)


def test_preact_taps_the_input_of_the_final_relu_and_prenorm_blocks_as_they_are():
    method = kr(*nets(), feature_point="preact")
    assert method.student_names == ["stages.0.0.relu:input", "stages.1.0.relu:input", "stages.2.0.relu:input"]
    wrn = kr(*nets("wrn_16_2", "wrn_16_1"), feature_point="preact")  # pre-activation blocks end in a sum
    assert wrn.student_names == ["stages.0.1", "stages.1.1", "stages.2.1"]


def test_regressors_are_one_by_one_conv_and_bn_per_stage():
    teacher = models.build("resnet32x4", num_classes=100)
    method = methods.build("kr", models.build("resnet8x4", num_classes=100), teacher, input_shape=(3, 8, 8))
    # 64->64, 128->128, 256->256 1x1 convs without bias, plus BN scale and shift
    assert method.side_parameter_count() == 64 * 64 + 128 * 128 + 256 * 256 + 2 * (64 + 128 + 256) == 86_912


def test_stages_pair_by_resolution_when_counts_differ():
    teacher, student = nets("resnet20", "mobile_half")  # mobile_half: 16, 8, 4, 2 at 32x32; resnet20: 32, 16, 8
    method = methods.build("kr", student, teacher, input_shape=(1, 32, 32))
    assert method.student_names == ["stages.0.2", "stages.1.2"]  # 16x16 and 8x8; 4x4 and 2x2 are unmatched
    assert method.teacher_groups == [["stages.1.2"], ["stages.2.2"]]


# ----------------------------------------------------------------------------------- reading B: weights
def test_quantile_prior_on_fixed_tensors():
    targets = quantile_targets(4, torch.tensor([0.0, 2.0]))  # Q_t through (0.25, 0) and (0.75, 2)
    assert torch.allclose(targets, torch.tensor([0.0, 0.5, 1.5, 2.0]))  # at u = 1/8, 3/8, 5/8, 7/8
    weights = torch.tensor([3.0, 0.0, 2.0, 1.0])  # sorted: 0, 1, 2, 3; gaps 0, 0.5, 0.5, 1
    assert quantile_prior(weights, targets, "w2").item() == pytest.approx((0 + 0.25 + 0.25 + 1) / 4)
    assert quantile_prior(weights, targets, "w1").item() == pytest.approx(2 / 4)


def test_moments_prior_is_zero_exactly_when_mean_and_std_match():
    weights = torch.tensor([1.0, 3.0])  # mean 2, population std 1
    assert moments_prior(weights, torch.tensor([2.0, 1.0])).item() == 0
    assert moments_prior(weights, torch.tensor([1.0, 2.0])).item() == pytest.approx(1 + 1)


def test_deadzone_soft_thresholds_the_prior_gradient():
    grad = torch.tensor([3.0, -3.0, 1.0, -1.0, 0.0])  # RMS 2
    assert torch.equal(sparse_gradient(grad, "deadzone", 1.0, 0.5), torch.tensor([2.0, -2.0, 0, 0, 0]))
    assert torch.equal(sparse_gradient(grad, "deadzone", 1.0, 0.25), torch.tensor([2.5, -2.5, 0.5, -0.5, 0]))


def permuted_copy(teacher):
    """The teacher with every conv's entries shuffled: per stage, the same scaled values in another order."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for conv in (m for m in student.modules() if isinstance(m, torch.nn.Conv2d)):
            flat = conv.weight.flatten()
            conv.weight.copy_(flat[torch.randperm(len(flat), generator=g)].view_as(conv.weight))
    return student


def test_prior_is_zero_for_a_permutation_of_the_teacher_weights_and_has_no_gradient():
    teacher, _ = nets("resnet8")
    method = kr(teacher, permuted_copy(teacher), space="weights", summary="full", kr_weight=1.0)
    surrogate, prior = method.weight_prior()
    assert prior.item() == 0
    surrogate.backward()
    assert all(c.weight.grad.abs().max() == 0 for convs in method.student_convs for c in convs)


def test_prior_is_invariant_to_permuting_the_student_weights():
    teacher, student = nets()
    method = kr(teacher, student, space="weights")
    before = [method.stage_prior(k).item() for k in range(3)]
    shuffled = kr(teacher, permuted_copy(student), space="weights")
    assert [shuffled.stage_prior(k).item() for k in range(3)] == before


def test_w1_prior_with_full_summary_is_the_wasserstein_distance():
    teacher, student = nets("resnet8")
    method = kr(teacher.double(), student.double(), space="weights", summary="full", divergence="w1")
    for k in range(3):
        expected = wasserstein_distance(scaled_stage_weights(student, k).numpy(),
                                        scaled_stage_weights(teacher, k).numpy())
        assert method.stage_prior(k).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("divergence", ["w2", "moments"])
def test_prior_gradient_keeps_exactly_the_top_rho_of_each_stage(divergence):
    teacher, student = nets()
    method = kr(teacher, student, space="weights", rho=0.1, divergence=divergence,
                summary="moments" if divergence == "moments" else "quantiles")
    surrogate, _ = method.weight_prior()
    surrogate.backward()
    for k, convs in enumerate(method.student_convs):
        params = [c.weight for c in convs]
        full = torch.cat([g.flatten() for g in torch.autograd.grad(method.stage_prior(k), params)])
        applied = torch.cat([p.grad.flatten() for p in params])
        kept = applied.nonzero().flatten()
        assert len(kept) == math.ceil(0.1 * len(full))
        assert torch.equal(applied[kept], full[kept])
        assert applied[kept].abs().min() >= full.abs().sort(descending=True).values[len(kept) - 1]


def test_teacher_summaries_are_fixed_buffers_and_the_teacher_gets_no_gradient():
    teacher, student = nets()
    method = kr(teacher, student, space="weights", kd_weight=1.0)
    saved = {k: v.clone() for k, v in method.trainable_state_dict().items() if k.startswith("teacher_")}
    assert len(saved) == 6  # quantiles and moments of three stages
    assert method.teacher_summary_0.shape == (1024,)
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.1)
    for seed in range(2):
        _, terms = method.train()(*batch(seed=seed))
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    assert all(torch.equal(getattr(method, k), v) for k, v in saved.items())
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------- both readings
@pytest.mark.parametrize("space", ["features", "weights"])
def test_zero_kr_and_kd_weights_leave_plain_cross_entropy(space):
    teacher, student = nets()
    method = kr(teacher, student, space=space, kr_weight=0.0).train()
    x, y = batch()
    logits, terms = method(x, y)
    assert sum(terms.values()).item() == F.cross_entropy(logits, y).item()


@pytest.mark.parametrize("space", ["features", "weights"])
def test_kr_plus_kd_adds_the_logit_kd_term(space):
    teacher, student = nets()
    method = kr(teacher, student, space=space, kd_weight=1.0, kr_weight=0.5).eval()
    x, y = batch()
    logits, terms = method(x, y)
    assert set(terms) == {"ce", "kr", "kd"}
    with torch.no_grad():
        assert terms["kd"].item() == pytest.approx(kd_loss(logits, teacher(x), 4.0).item())


@pytest.mark.parametrize("space", ["features", "weights"])
def test_auto_weight_matches_ce_over_the_calibration_batches_then_stays(space):
    teacher, student = nets()
    method = kr(teacher, student, space=space, calib_batches=3).train()
    ce, unweighted = [], []
    for seed in range(3):
        x, y = batch(8, seed)
        logits, terms = method(x, y)
        ce.append(F.cross_entropy(logits, y).item())
        unweighted.append(terms["kr"].item() / method.kr_weight_value.item())  # the weight used at this batch
    weight = method.kr_weight_value.item()
    assert weight * np.mean(unweighted) == pytest.approx(np.mean(ce), rel=1e-6)
    method(*batch(8, 9))
    assert method.kr_weight_value.item() == weight
    restored = kr(*nets(), space=space, calib_batches=3)
    restored.load_trainable_state_dict(method.trainable_state_dict())
    restored.train()(*batch(8, 10))
    assert restored.kr_weight_value.item() == weight


def test_deployed_student_has_no_kr_modules():
    teacher, student = nets()
    method = kr(teacher, student)
    plain = models.build("resnet8", num_classes=10, in_channels=1)
    deployed = method.deploy()
    assert deployed is student and not any("regressor" in k for k in deployed.state_dict())
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in plain.parameters())


def test_option_errors_name_the_option():
    teacher, student = nets()
    with pytest.raises(ConfigError, match="summary=moments"):
        kr(teacher, student, space="weights", summary="moments")
    with pytest.raises(ConfigError, match=r"method\.options\.rho"):
        kr(teacher, student, rho=0)
    with pytest.raises(ConfigError, match=r"method\.options\.stages"):
        kr(teacher, student, stages=[5])


# ----------------------------------------------------------------------------------- tiny real runs
# 600 training images, three cosine epochs in batches of 50
RUN = ("data.val_size=200", "data.train_subset=600", "train.epochs=3", "train.batch_size=50",
       "train.schedule.name=cosine")


@pytest.mark.parametrize("space", ["features", "weights"])
def test_tiny_digits_run_trains(tmp_path, digits_teacher, space):
    cfg = tiny_run(tmp_path, "kr", *RUN, "method.name=kr", f"method.options.space={space}",
                   *teacher_changes(digits_teacher))
    summary = train_run(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss_ce"] < records[0]["loss_ce"]
    assert summary["test_acc"] > 30.0  # chance is 10%
    assert np.isfinite(records[-1]["loss_kr"])
