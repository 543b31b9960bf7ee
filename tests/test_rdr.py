"""RDR (reconstructed): spec shared/methods/rdr.md §8, plus the method's own contract."""

from __future__ import annotations

import itertools
import json
import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import teacher_changes, tiny_run
from distillab import methods, models
from distillab.cli import main
from distillab.data import load_splits
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from distillab.engine.evaluate import eval_loader, evaluate
from distillab.engine.trainer import chance_threshold
from distillab.errors import ConfigError
from distillab.features import FeatureTap
from distillab.methods import rdr as rdr_module
from distillab.methods.rdr import (
    abar_schedule,
    as_feature_map,
    draw_order,
    progressive_loss,
    step_features,
    step_targets,
    trajectory_start,
)
from distillab.reparam import RepBranches
from distillab.run import load_run_config, train_run
from test_reparam import randomize_bn

SIZE = 16  # 16x16 inputs keep the zoo forwards cheap; every zoo model accepts them
IMAGE = (3, SIZE, SIZE)


@cache
def _teacher(name: str = "resnet8", in_channels: int = 3, num_classes: int = 100, **kwargs) -> nn.Module:
    torch.manual_seed(1)
    return models.build(name, num_classes=num_classes, in_channels=in_channels, **kwargs).eval()


def rdr(student: str = "resnet8", teacher: str = "resnet8", in_channels: int = 3, num_classes: int = 100,
        teacher_kwargs: dict | None = None, **options) -> methods.Method:
    torch.manual_seed(0)
    s = models.build(student, num_classes=num_classes, in_channels=in_channels)
    t = _teacher(teacher, in_channels, num_classes, **(teacher_kwargs or {}))
    return methods.build("rdr", s, t, input_shape=(in_channels, SIZE, SIZE), **options)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def batch(n: int = 8, shape=IMAGE, classes: int = 100, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---- §8.1-2: exact merge and the plain exported student ------------------------------------------------
# Spec §2 table: the replaced conv, the BN after it (None: bare-conv branches), the student feature, the kernel.
SITES = {
    "resnet8x4": ("stages.2.0.conv2", "stages.2.0.bn2", "stages.2.0.relu:input", 3),
    "wrn_16_2": ("stages.2.1.conv2", None, "stages.2.1", 3),
    "vgg8": ("stages.3.0.conv", "stages.3.0.bn", "stages.3.0.relu:input", 3),
    "MobileNetV2": ("head.pre.conv", "head.pre.bn", "head.pre.relu:input", 1),
    "ShuffleV1": ("stages.2.3.conv3", "stages.2.3.bn3", "stages.2.3.relu:input", 1),
    "ShuffleV2": ("head.pre.conv", "head.pre.bn", "head.pre.relu:input", 1),
}
MIXED = {"K": 4, "branch_kinds": ["3x3", "3x3", "1x1", "identity"]}


def assert_merge_is_exact(method: methods.Method) -> None:
    """Every BN randomised (branches included), eval mode: multi-branch and merged logits agree within 1e-4."""
    randomize_bn(method.student, seed=3)
    method.eval()
    x, _ = batch()
    with torch.no_grad():
        multi = method.student(x)
        plain = method.deploy().eval()(x)
    assert multi.std() > 0.05  # the comparison is not between near-zero logits
    assert (multi - plain).abs().max() < 1e-4


@pytest.mark.parametrize("student", sorted(SITES))
def test_default_site_is_the_spec_table_layer_and_merges_exactly(student):
    conv, bn, feature, kernel = SITES[student]
    method = rdr(student)
    assert (method.site.conv, method.site.bn, method.site.feature) == (conv, bn, feature)
    layer = method.student.get_submodule(conv)
    assert isinstance(layer, RepBranches) and layer.kinds == [f"{kernel}x{kernel}"] * 4
    assert layer.with_bn == (bn is not None)
    if bn is not None:
        assert isinstance(method.student.get_submodule(bn), nn.Identity)
    assert_merge_is_exact(method)


@pytest.mark.parametrize(
    ("student", "options"),
    [(s, {"K": 1}) for s in ("resnet8x4", "wrn_16_2", "MobileNetV2")]
    + [(s, {"K": 2}) for s in ("resnet8x4", "wrn_16_2")]
    + [(s, MIXED) for s in ("resnet8x4", "wrn_16_2", "vgg8")]
    + [(s, {"start": "initial"}) for s in ("resnet8x4", "wrn_16_2", "MobileNetV2")],
    ids=lambda v: str(v),
)
def test_merge_is_exact_for_every_branch_count_and_kind(student, options):
    assert_merge_is_exact(rdr(student, **options))


@pytest.mark.parametrize("student", ["resnet8", "wrn_16_2"])
def test_exported_student_is_the_plain_architecture(student):
    method = rdr(student)
    randomize_bn(method.student, seed=4)
    method.eval()
    deployed = method.deploy().eval()
    fresh = models.build(student, num_classes=100)
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    fresh.eval()
    x, _ = batch(4)
    assert type(fresh) is type(deployed)
    assert n_params(deployed) == n_params(models.build(student, num_classes=100))
    assert flops(deployed, x) == flops(models.build(student, num_classes=100), x) < flops(method.student, x)
    with torch.no_grad():
        assert (fresh(x) - method.student(x)).abs().max() < 1e-4


def test_fuse_bn_deploys_one_biased_conv_with_the_same_output():
    method = rdr("resnet8", fuse_bn=True)
    randomize_bn(method.student, seed=5)
    method.eval()
    deployed = method.deploy().eval()
    block = deployed.stages[2][0]
    assert isinstance(block.bn2, nn.Identity) and block.conv2.bias is not None
    x, _ = batch(4)
    with torch.no_grad():
        assert (deployed(x) - method.student(x)).abs().max() < 1e-4


# ---- where the branches go -------------------------------------------------------------------------
def test_where_names_another_conv():
    method = rdr("resnet8x4", K=2, where="stages.2.0.shortcut.conv")  # the 1x1 projection, stride 2
    assert method.site.bn == "stages.2.0.shortcut.bn"
    randomize_bn(method.student, seed=6)
    method.eval()
    x, _ = batch(4)
    with torch.no_grad():
        assert (method.student(x) - method.deploy().eval()(x)).abs().max() < 1e-4


def test_first_branch_keeps_the_students_initial_kernel():
    torch.manual_seed(0)
    plain = models.build("resnet8", num_classes=100)
    method = rdr("resnet8", K=3)
    first = method.student.stages[2][0].conv2.branches[0].conv.weight
    assert torch.equal(first, plain.stages[2][0].conv2.weight)
    others = method.student.stages[2][0].conv2.branches[1].conv.weight
    assert not torch.equal(others, first)
    assert math.isclose(others.std().item(), first.std().item(), rel_tol=0.15)


def test_side_parameters_count_the_extra_branches_and_the_bridge():
    method = rdr("resnet8", K=4)  # conv2 64->64 3x3 + BN per branch; bridge 64->64 1x1 + BN
    per_branch = 64 * 64 * 9 + 2 * 64
    assert method.side_parameter_count() == 3 * per_branch + (64 * 64 + 2 * 64)
    assert n_params(method.deploy()) == n_params(models.build("resnet8", num_classes=100))


# ---- §8.3-4: order and partial sums ---------------------------------------------------------------
def branch_outputs(k: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g) for _ in range(k)]


def test_partial_sums_follow_the_order():
    ys = branch_outputs()
    order = [2, 0, 3, 1]
    z = step_features(ys, order)
    expected = [ys[2], ys[2] + ys[0], ys[2] + ys[0] + ys[3], ys[2] + ys[0] + ys[3] + ys[1]]
    for got, want in zip(z, expected, strict=True):
        assert torch.equal(got, want)


def test_single_branch_features_are_the_branches_in_order():
    ys = branch_outputs()
    assert all(torch.equal(a, b) for a, b in zip(step_features(ys, [3, 1, 0, 2], "single_branch"),
                                                  [ys[3], ys[1], ys[0], ys[2]], strict=True))


def test_full_sum_does_not_depend_on_the_order():
    ys = branch_outputs()
    a, b = step_features(ys, [0, 1, 2, 3]), step_features(ys, [3, 1, 2, 0])
    assert not torch.allclose(a[0], b[0])
    assert (a[-1] - b[-1]).abs().max() < 1e-6


def test_logits_do_not_depend_on_the_order_drawn():
    method = rdr(K=4)
    x, y = batch(4)
    orders = []
    for seed in (10, 12):
        torch.manual_seed(seed)
        orders.append(draw_order(4).tolist())
    assert orders[0] != orders[1]
    torch.manual_seed(10)
    first, terms_a = method(x, y)
    torch.manual_seed(12)
    second, terms_b = method(x, y)
    assert torch.equal(first, second)
    assert terms_a["rdr"].item() != terms_b["rdr"].item()  # a different order, different partial features


# ---- §8.5-7: schedule, targets, detached start ----------------------------------------------------
def test_schedules_for_four_steps():
    assert abar_schedule(4, "linear") == [0.25, 0.5, 0.75, 1.0]
    # cos²(π/2·(4−k)/4): cos²(3π/8) = 0.14645, cos²(π/4) = 0.5, cos²(π/8) = 0.85355, 1
    assert abar_schedule(4, "cosine") == pytest.approx([0.1464, 0.5, 0.8536, 1.0], abs=1e-4)
    assert abar_schedule(4, "cosine")[-1] == 1.0


@pytest.mark.parametrize("mix", ["vp", "linear"])
def test_last_target_is_the_teacher_feature_bitwise(mix):
    g = torch.Generator().manual_seed(0)
    t, x_n = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    targets = step_targets(t, x_n, abar_schedule(4), mix)
    assert torch.equal(targets[-1], t)


def test_intermediate_targets_by_hand():
    t, x_n = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    vp = step_targets(t, x_n, [0.25, 1.0], "vp")
    linear = step_targets(t, x_n, [0.25, 1.0], "linear")
    assert vp[0].item() == pytest.approx(0.5 * 2.0 + math.sqrt(0.75) * -1.0)
    assert linear[0].item() == pytest.approx(0.25 * 2.0 + 0.75 * -1.0)


def test_noise_scale_follows_sigma_k_and_spares_the_last_target():
    t, x_n = torch.zeros(1, 1, 200, 200), torch.zeros(1, 1, 200, 200)
    torch.manual_seed(0)
    targets = step_targets(t, x_n, [0.36, 1.0], "linear", sigma_scale=2.0)
    assert targets[0].std().item() == pytest.approx(2.0 * math.sqrt(0.64), rel=0.02)
    assert torch.equal(targets[1], t)


def test_start_is_detached_so_only_the_prediction_term_has_a_gradient():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, 4, generator=g)
    h = [torch.randn(2, 3, 4, 4, generator=g, requires_grad=True) for _ in range(4)]
    abar, weights = abar_schedule(4), [0.1, 0.2, 0.3, 0.4]
    targets = step_targets(t, trajectory_start(h[0], "student"), abar, "vp")
    progressive_loss(h, targets, weights).backward()
    # target_1 = √ā_1·t + √(1−ā_1)·h_1 (constant), so dL/dh_1 = w_1·2(h_1 − target_1)/numel and nothing more
    target_1 = 0.5 * t + math.sqrt(0.75) * h[0].detach()
    torch.testing.assert_close(h[0].grad, 0.1 * 2 * (h[0].detach() - target_1) / h[0].numel())
    assert all(not target.requires_grad for target in targets)


def optimum_points(start: str, mix: str, schedule: str = "linear", steps: int = 4, iters: int = 3000,
                   initial: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient descent on free tensors h_1..h_K standing in for the bridged partial sums, with the method's own
    start (`initial`: the fixed x_0 of start=initial), targets and loss; returns the h_k at the end (averaged over
    the last third of the iterations, with a decaying step, so that a noisy target gives its expectation) and t."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 32, generator=g)
    h = [(0.1 * torch.randn(16, 32, generator=g)).requires_grad_() for _ in range(steps)]
    abar, weights = abar_schedule(steps, schedule), [1.0 / steps] * steps
    torch.manual_seed(0)
    average = [torch.zeros_like(t) for _ in h]
    for i in range(iters):
        x_0 = initial if start == "initial" else trajectory_start(h[0], start)
        loss = progressive_loss(h, step_targets(t, x_0, abar, mix), weights)
        grads = torch.autograd.grad(loss, h)
        lr = t.numel() * steps / 2 * min(0.5, 20 / (i + 1))  # a step of half the way to the target, then decaying
        with torch.no_grad():
            for k, (x, dx) in enumerate(zip(h, grads, strict=True)):
                x -= lr * dx
                if i >= 2 * iters // 3:
                    average[k] += x / (iters - 2 * iters // 3)
    return average, t


def optimum(start: str, mix: str, schedule: str = "linear", steps: int = 4, iters: int = 3000) -> list[float]:
    """||h_k - t|| / ||t|| at the optimum (`optimum_points`)."""
    points, t = optimum_points(start, mix, schedule, steps, iters)
    return [((a - t).norm() / t.norm()).item() for a in points]


@pytest.mark.parametrize(("start", "mix"), [("zero", "linear"), ("zero", "vp"), ("noise", "linear"), ("noise", "vp")])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_at_the_optimum_the_partial_sums_approach_the_teacher_step_by_step(start, mix, schedule):
    distances = optimum(start, mix, schedule)
    assert all(a > b + 0.05 for a, b in itertools.pairwise(distances)), distances  # strictly closer at each step
    assert distances[-1] < 0.02, distances  # the full sum is the teacher feature
    assert distances[0] < 1.0, distances  # never farther from t than the zero feature: no amplified teacher
    if start == "zero" and mix == "linear" and schedule == "linear":  # the default: target_k = (k/K)·t exactly
        assert distances == pytest.approx([0.75, 0.5, 0.25, 0.0], abs=0.02)


def test_the_first_design_a_start_that_moves_with_the_student_fails_the_optimum_test():
    distances = optimum("student", "vp")
    # The measurement: partial sums ≈ 3.7 t, 3.3 t, 2.7 t, t, i.e. distances ≈ 2.7, 2.3, 1.7, 0.
    assert distances[0] > 2.0 and distances[-1] < 0.02, distances
    assert distances == pytest.approx([2.73, 2.33, 1.73, 0.0], abs=0.1)


def test_default_targets_are_the_mean_of_shuffled_partial_sums():
    """Over all K! orders, the k-th partial sum of K branch outputs is on average (k/K) times the full sum: the
    default targets (k/K)·t are the only ones the branches can meet together, whatever order is drawn."""
    g = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 3, generator=g) for _ in range(4)]
    orders = list(itertools.permutations(range(4)))
    mean = [sum(step_features(outputs, list(o))[k] for o in orders) / len(orders) for k in range(4)]
    full = sum(outputs)
    for k in range(4):
        torch.testing.assert_close(mean[k], (k + 1) / 4 * full)
    targets = step_targets(full, trajectory_start(full), abar_schedule(4))  # the default start, mix and schedule
    for k in range(4):
        torch.testing.assert_close(targets[k], mean[k])


def test_a_start_frozen_at_initialisation_moves_the_intermediate_optima_beyond_t_not_the_last():
    """start: initial (x_0 = s_0, the network's own bridged feature at initialisation, fixed per image). Property:
    the optimum of the summed step losses is h_k = s_0 + (k/K)(t - s_0), on the segment from s_0 to t. For k < K
    it depends on s_0, so it carries information beyond t (the default's optima (k/K)·t are functions of t alone);
    the full sum, the merged layer, still has t as its optimum, whatever s_0."""
    g = torch.Generator().manual_seed(7)
    s_0, other = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    points, t = optimum_points("initial", "linear", initial=s_0)
    for k, h in enumerate(points, start=1):
        torch.testing.assert_close(h, s_0 + k / 4 * (t - s_0), atol=1e-4, rtol=0)
    distances = [((h - t).norm() / (s_0 - t).norm()).item() for h in points]
    assert distances == pytest.approx([0.75, 0.5, 0.25, 0.0], abs=1e-3)  # walks from where it started to t
    default, _ = optimum_points("zero", "linear")
    moved, _ = optimum_points("initial", "linear", initial=other)
    for k in range(3):  # the intermediate optima: neither t, nor the default's, nor those of another start
        for elsewhere in (t, default[k], moved[k]):
            assert (points[k] - elsewhere).norm() > 0.2 * t.norm(), k
    assert (points[-1] - t).norm() < 1e-3 * t.norm() and (moved[-1] - t).norm() < 1e-3 * t.norm()


def test_initial_start_targets_are_the_mean_of_shuffled_partial_sums_over_a_shortcut_at_the_start():
    """The targets s_0 + (k/K)(t - s_0) are met together, whatever order is drawn, when what every partial sum
    shares (the bridged shortcut) is s_0 and the branches add t - s_0 (the bridge taken as the identity)."""
    g = torch.Generator().manual_seed(1)
    outputs, shortcut = [torch.randn(2, 3, generator=g) for _ in range(4)], torch.randn(2, 3, generator=g)
    orders = list(itertools.permutations(range(4)))
    mean = [sum(step_features(outputs, list(o))[k] + shortcut for o in orders) / len(orders) for k in range(4)]
    targets = step_targets(shortcut + sum(outputs), shortcut, abar_schedule(4))
    for k in range(4):
        torch.testing.assert_close(targets[k], mean[k])
    with pytest.raises(ValueError, match="initial"):
        trajectory_start(shortcut, "initial")


def test_initial_start_is_the_network_at_initialisation_and_stays_put_while_it_trains(monkeypatch):
    method = rdr(K=4, start="initial")
    x, y = batch(8)
    with torch.no_grad():  # the bridged f_K of the network as it is now (train mode: the batch's statistics)
        method.student(x)
        reference = method.bridge(method.student_tap.take()[-1])
    starts = []

    def recording(teacher, start, *args, **kwargs):
        starts.append(start)
        return step_targets(teacher, start, *args, **kwargs)

    monkeypatch.setattr(rdr_module, "step_targets", recording)
    _, terms = method(x, y)
    torch.testing.assert_close(starts[0], reference)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    sum(terms.values()).backward()
    optimizer.step()
    method(x, y)
    assert torch.equal(starts[0], starts[1])  # the network moved (below), its start did not
    with torch.no_grad():
        method.student(x)
        assert (method.bridge(method.student_tap.take()[-1]) - reference).abs().max() > 1e-2
    assert not any(p.requires_grad for p in method.initial.parameters()) and not list(method.initial.buffers())
    assert all(p.grad is None for p in method.initial.parameters())


def test_initial_start_targets_through_the_method_by_hand():
    method = rdr(K=2, shuffle=False, start="initial", rdr_weight=2.0).eval()
    x, y = batch(4)
    _, terms = method(x, y)
    names = ["stages.2.0.conv2.branches.1", "stages.2.0.relu:input"]
    with FeatureTap(method.student, names) as tap, FeatureTap(method.teacher, ["stages.2.0.relu:input"]) as t_tap, \
            torch.no_grad():
        method.student(x)
        method.teacher(x)
        y1, f = tap.values()
        t = t_tap["stages.2.0.relu:input"]
        h1, h2 = method.bridge(torch.cat([f - y1, f])).split(4)
        method.student.train()  # untrained, so the network at initialisation; its start takes batch statistics
        method.bridge.train()
        method.student(x)
        s_0 = method.bridge(tap["stages.2.0.relu:input"])
        expected = 2.0 * (0.5 * F.mse_loss(h1, s_0 + 0.5 * (t - s_0)) + 0.5 * F.mse_loss(h2, t))
    assert terms["rdr"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_initial_start_keeps_no_copy_at_one_step_and_adds_no_side_or_deployed_parameters():
    assert rdr(K=1, start="initial").initial is None  # K = 1: the only target is t
    x, y = batch(4)
    torch.manual_seed(3)
    one = rdr(K=1, start="initial")(x, y)[1]["rdr"]
    torch.manual_seed(3)
    assert torch.equal(one, rdr(K=1)(x, y)[1]["rdr"])
    method = rdr(K=3, start="initial", bridge="per_step")
    assert torch.equal(method.initial["bridge"][0].weight, method.bridge[-1][0].weight)  # the bridge that maps f_K
    assert method.side_parameter_count() == rdr(K=3, bridge="per_step").side_parameter_count()
    assert list(method.deploy().state_dict()) == list(models.build("resnet8", num_classes=100).state_dict())


def test_noise_start_is_pure_noise_and_noisy_start_adds_it():
    first = torch.full((1, 1, 100, 100), 3.0, requires_grad=True)
    torch.manual_seed(0)
    assert abs(trajectory_start(first, "noise").mean().item()) < 0.05
    torch.manual_seed(0)
    noisy = trajectory_start(first, "student_plus_noise", sigma=0.5)
    assert not noisy.requires_grad and noisy.std().item() == pytest.approx(0.5, rel=0.05)
    assert noisy.mean().item() == pytest.approx(3.0, abs=0.05)


# ---- §8.8: the permutation ------------------------------------------------------------------------
def test_order_is_redrawn_every_step_uniformly_and_reproducibly():
    torch.manual_seed(0)
    draws = [draw_order(4).tolist() for _ in range(10_000)]
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=4).float() / len(draws)
    assert (counts - 0.25).abs().max() < 0.02
    assert all(sorted(d) == [0, 1, 2, 3] for d in draws)
    assert len({tuple(d) for d in draws[:50]}) > 10  # re-drawn, not fixed
    torch.manual_seed(0)
    assert [draw_order(4).tolist() for _ in range(100)] == draws[:100]
    assert draw_order(4, shuffle=False).tolist() == [0, 1, 2, 3]


# ---- §8.9: K = 1 is a last-stage hint; the loss through the method ----------------------------------
def test_one_step_is_a_hint_through_the_bridge():
    method = rdr(K=1).eval()  # eval: deterministic BN, so the hand computation sees the same numbers
    x, y = batch(4)
    logits, terms = method(x, y)
    with FeatureTap(method.student, ["stages.2.0.relu:input"]) as s_tap, \
         FeatureTap(method.teacher, ["stages.2.0.relu:input"]) as t_tap, torch.no_grad():
        method.student(x)
        method.teacher(x)
        hint = F.mse_loss(method.bridge(s_tap["stages.2.0.relu:input"]), t_tap["stages.2.0.relu:input"])
    assert terms["rdr"].item() == pytest.approx(hint.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert set(terms) == {"ce", "rdr"}


def test_progressive_loss_through_the_method_by_hand():
    method = rdr(K=2, shuffle=False, rdr_weight=2.0).eval()  # the default targets: (k/K)·t
    x, y = batch(4)
    _, terms = method(x, y)
    names = ["stages.2.0.conv2.branches.0", "stages.2.0.conv2.branches.1", "stages.2.0.relu:input"]
    with FeatureTap(method.student, names) as tap, FeatureTap(method.teacher, ["stages.2.0.relu:input"]) as t_tap, \
            torch.no_grad():
        method.student(x)
        method.teacher(x)
        _, y1, f = tap.values()
        t = t_tap["stages.2.0.relu:input"]
        f1 = f - y1  # the first partial feature: branch 0 plus the shortcut
        h1, h2 = method.bridge(torch.cat([f1, f])).split(4)
        expected = 2.0 * (0.5 * F.mse_loss(h1, 0.5 * t) + 0.5 * F.mse_loss(h2, t))  # ā_1 = 1/2, x_0 = 0
    assert terms["rdr"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_logit_kd_and_target_guided_terms():
    method = rdr(K=3, shuffle=False, kd_weight=0.5, temperature=2.0, target_guided=True, tg_weight=0.3).eval()
    x, y = batch(4)
    logits, terms = method(x, y)
    assert set(terms) == {"ce", "rdr", "kd", "tg"}
    block = method.student.stages[2][0]
    names = [f"stages.2.0.conv2.branches.{i}" for i in range(3)] + ["stages.2.0.relu:input"]
    with FeatureTap(method.student, names) as tap, torch.no_grad():
        method.student(x)
        _, y1, y2, f = tap.values()
        t_logits = method.teacher(x)
        partial = [f - y1 - y2, f - y2]  # f_1, f_2 in the fixed order 0, 1, 2
        ce = [F.cross_entropy(method.student.head(block.relu(p)), y) for p in partial]
    p_s, p_t = F.log_softmax(logits / 2.0, 1), F.softmax(t_logits / 2.0, 1)
    kd = (p_t * (p_t.log() - p_s)).sum(1).mean() * 4.0
    assert terms["kd"].item() == pytest.approx(0.5 * kd.item(), rel=1e-4)
    assert terms["tg"].item() == pytest.approx(0.3 * (ce[0] + ce[1]).item() / 2, rel=1e-4)


@pytest.mark.parametrize(("student", "where"), [("resnet8", None), ("MobileNetV2", None),
                                              ("MobileNetV2", "stages.3.3.conv3")])
def test_target_guided_logits_of_the_whole_feature_are_the_students_logits(student, where):
    """The head's rest is found by role: the pre-pool layers (when the site is the last block), the pooling, the
    classifier; continued from the full feature it gives the student's own logits."""
    method = rdr(student, K=2, target_guided=True, **({"where": where} if where else {})).eval()
    x, _ = batch(3)
    with torch.no_grad():
        logits = method.student(x)
        *_, feature = method.student_tap.take()
        assert torch.allclose(method.logits_from_feature(feature), logits, atol=1e-5)


# ---- §8.10: invalid configurations ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("student", "options", "message"),
    [
        ("ShuffleV2", {"K": 2, "where": "stages.2.0.conv1", "branch_kinds": ["3x3", "identity"]},
         "identity branch needs .* stride 2"),
        ("MobileNetV2", {"K": 2, "branch_kinds": ["1x1", "identity"]}, "identity branch needs .*160 -> 1280"),
        ("MobileNetV2", {"K": 1, "branch_kinds": ["3x3"]}, "branch_kinds: a 3x3 branch cannot merge into a 1x1"),
        ("resnet8", {"K": 3, "branch_kinds": ["3x3", "1x1"]}, "branch_kinds: .*needs K=3 entries, got 2"),
        ("resnet8", {"K": 2, "branch_kinds": ["3x3", "5x3"]}, "branch_kinds: .*unknown branch kind '5x3'"),
        ("resnet8", {"K": 2, "w_k": [1.0]}, "w_k: .*needs K=2 entries"),
        ("resnet8", {"K": 0}, "method.options.K"),
        ("resnet8", {"where": "stages.2"}, "where: 'stages.2' is not a Conv2d"),
        ("resnet8", {"where": "stages.2.0.conv1"}, "where: .*cannot give partial features"),
        ("resnet8", {"where": "stages.1.0.conv2", "target_guided": True}, "target_guided needs"),
    ],
)
def test_invalid_configurations_raise_config_errors(student, options, message):
    with pytest.raises(ConfigError, match=message):
        rdr(student, **options)


def test_non_zoo_student_must_name_the_layer():
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ConfigError, match=r"set method\.options\.where"):
        methods.build("rdr", student, _teacher(), input_shape=IMAGE)


# ---- §8.11 and training ---------------------------------------------------------------------------
def test_gradients_reach_every_branch_and_the_bridge_not_the_teacher():
    method = rdr(K=4, branch_kinds=["3x3", "3x3", "1x1", "identity"]).train()
    x, y = batch(8)
    _, terms = method(x, y)
    terms["rdr"].backward()
    layer = method.branches
    for i, branch in enumerate(layer.branches):
        for name, p in branch.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (i, name)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.bridge.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())


def test_deployed_student_has_no_bridge_and_never_calls_the_teacher():
    method = rdr(K=2)
    deployed = method.deploy()
    assert not any("bridge" in k or "branches" in k for k in deployed.state_dict())
    assert not any(isinstance(m, RepBranches) for m in deployed.modules())
    calls = []
    handle = method.teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        deployed(batch(2)[0])
    finally:
        handle.remove()
    assert calls == []


def test_per_step_bridges_are_k_modules():
    method = rdr(K=3, bridge="per_step")
    assert len(method.bridge) == 3
    _, terms = method(*batch(4))
    terms["rdr"].backward()
    assert all(p.grad is not None for p in method.bridge.parameters())


def test_trainable_state_round_trips_into_a_fresh_method():
    a = rdr(K=3)
    a(*batch(4))  # one training forward: running statistics move
    b = rdr(K=3)
    b.load_trainable_state_dict(a.trainable_state_dict())
    x, _ = batch(4)
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a.student(x), b.student(x))
        assert torch.equal(a.deploy().eval()(x), b.deploy().eval()(x))


# ---- Transformer teacher --------------------------------------------------------------------------
def test_tokens_become_maps_and_a_class_token_is_dropped():
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    grid = as_feature_map(tokens)
    assert grid.shape == (2, 3, 4, 4) and torch.equal(grid[1, 2, 1, 3], tokens[1, 7, 2])
    with_cls = torch.cat([torch.full((2, 1, 3), -1.0), tokens], 1)
    assert torch.equal(as_feature_map(with_cls), grid)
    with pytest.raises(ConfigError, match="tokens"):
        as_feature_map(torch.zeros(1, 7, 3))


def test_vit_teacher_feature_is_pooled_to_the_student_map():
    # vit_tiny with 2-px patches gives an 8x8 token map of a 16x16 image; resnet8's last map is 4x4.
    method = rdr("resnet8", "vit_tiny", in_channels=1, num_classes=10, K=2,
                 teacher_kwargs={"image_size": SIZE, "patch_size": 2, "dim": 32, "depth": 2, "heads": 2, "stages": 2})
    assert method.teacher_name == "stages.1"
    assert method.bridge[0].out_channels == 32
    x, y = batch(4, (1, SIZE, SIZE), 10)
    _, terms = method(x, y)
    assert torch.isfinite(terms["rdr"])
    with FeatureTap(method.teacher, ["stages.1"]) as tap, torch.no_grad():
        method.teacher(x)
    assert tap["stages.1"].shape == (4, 32, 8, 8)


# ---- integration: digits through the trainer, resume, `distillab export` --------------------------------
# 300 training images, two constant-lr epochs in batches of 50 (cut after the first)
RUN = ("data.train_subset=300", "train.epochs=2", "train.batch_size=50", "train.schedule.name=constant")
DIGITS_PARAMS = {"num_classes": 10, "in_channels": 1}


def digits_config(out, teacher: str, name: str, *extra: str):
    return tiny_run(out, name, *RUN, "method.name=rdr", "method.options.K=3", *teacher_changes(teacher, "resnet8"),
                    *extra)


@pytest.fixture(scope="module")
def rdr_run(tmp_path_factory, untrained_digits_teacher):
    cfg = digits_config(tmp_path_factory.mktemp("rdr_run"), untrained_digits_teacher, "full")
    return cfg, train_run(cfg)


def test_digits_run_learns_and_ships_the_plain_student(rdr_run):
    cfg, summary = rdr_run
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss_rdr"] < records[0]["loss_rdr"]
    # above chance (10 %) by 3 standard errors: the student's 2 short epochs spend much on matching the teacher's maps
    assert summary["test_acc"] > chance_threshold(10, 360)
    assert summary["student_params"] == n_params(models.build("resnet8", **DIGITS_PARAMS))
    assert summary["side_params"] == 2 * (64 * 64 * 9 + 128) + 64 * 64 + 128
    fresh = models.build("resnet8", **DIGITS_PARAMS)
    fresh.load_state_dict(load_file(str(cfg.run_dir / "student.safetensors")), strict=True)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, untrained_digits_teacher, rdr_run):
    def stop_after_first_epoch(epoch, _record):
        if epoch == 1:
            raise Interrupt

    cut = digits_config(tmp_path, untrained_digits_teacher, "cut")
    with pytest.raises(Interrupt):
        train_run(cut, on_epoch_end=stop_after_first_epoch)
    train_run(load_run_config(cut.run_dir), resume=True)
    a = load_checkpoint(rdr_run[0].run_dir / CHECKPOINT_FILE)["method"]
    b = load_checkpoint(cut.run_dir / CHECKPOINT_FILE)["method"]
    assert a.keys() == b.keys() and any(".branches.2." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_writes_the_plain_student_with_the_runs_test_accuracy(rdr_run, tmp_path, capsys):
    cfg, summary = rdr_run
    out = tmp_path / "resnet8.safetensors"
    assert main(["export", str(cfg.run_dir), "--output", str(out)]) == 0
    params = n_params(models.build("resnet8", **DIGITS_PARAMS))
    assert f"resnet8 ({params:,} parameters)" in capsys.readouterr().out
    exported = load_file(str(out))
    shipped = load_file(str(cfg.run_dir / "student.safetensors"))
    assert exported.keys() == shipped.keys() and all(torch.equal(exported[k], shipped[k]) for k in shipped)
    fresh = models.build("resnet8", **DIGITS_PARAMS)
    fresh.load_state_dict(exported, strict=True)
    test = load_splits(cfg.data).test
    assert evaluate(fresh, eval_loader(test))["acc"] == pytest.approx(summary["test_acc"], abs=1e-9)


def test_export_can_fuse_the_merged_bn(rdr_run, tmp_path):
    cfg, _ = rdr_run
    out = tmp_path / "fused.safetensors"
    assert main(["export", str(cfg.run_dir), "--output", str(out), "--set", "method.options.fuse_bn=true"]) == 0
    fused = load_file(str(out))
    assert "stages.2.0.conv2.bias" in fused and not any(k.startswith("stages.2.0.bn2.") for k in fused)
    plain = load_file(str(cfg.run_dir / "student.safetensors"))
    assert len(plain) - len(fused) == 4  # bn2's five entries are gone, conv2.bias is new


def test_a_digits_run_with_the_initial_start_keeps_its_frozen_copy_and_ships_the_plain_student(
        tmp_path, untrained_digits_teacher):
    cfg = digits_config(tmp_path, untrained_digits_teacher, "initial", "method.options.start=initial",
                        "train.epochs=1")
    summary = train_run(cfg)
    state = load_checkpoint(cfg.run_dir / CHECKPOINT_FILE)["method"]
    assert any(k.startswith("initial.student.stages.2.0.conv2.branches.2.") for k in state)
    assert summary["side_params"] == 2 * (64 * 64 * 9 + 128) + 64 * 64 + 128  # the frozen copy is not counted
    out = tmp_path / "initial.safetensors"
    assert main(["export", str(cfg.run_dir), "--output", str(out)]) == 0  # the rebuilt method takes the checkpoint
    fresh = models.build("resnet8", **DIGITS_PARAMS)
    fresh.load_state_dict(load_file(str(out)), strict=True)
    test = load_splits(cfg.data).test
    assert evaluate(fresh, eval_loader(test))["acc"] == pytest.approx(summary["test_acc"], abs=1e-9)


def test_export_of_another_method_is_its_student(tmp_path, untrained_digits_teacher, capsys):
    cfg = digits_config(tmp_path, untrained_digits_teacher, "ce", "method.name=ce", "method.options={}",
                        "train.epochs=1")
    train_run(cfg)
    out = tmp_path / "ce.safetensors"
    assert main(["export", str(cfg.run_dir), "--output", str(out)]) == 0
    exported, shipped = load_file(str(out)), load_file(str(cfg.run_dir / "student.safetensors"))
    assert exported.keys() == shipped.keys() and all(torch.equal(exported[k], shipped[k]) for k in shipped)


def test_export_of_a_memory_bank_method_works(tmp_path, untrained_digits_teacher):
    """CRD's memory bank is made from the training set's labels: export builds the same complete method."""
    cfg = digits_config(tmp_path, untrained_digits_teacher, "crd", "method.name=crd",
                        "method.options={num_negatives: 64, feat_dim: 16}", "train.epochs=1")
    train_run(cfg)
    out = tmp_path / "crd.safetensors"
    assert main(["export", str(cfg.run_dir), "--output", str(out)]) == 0
    exported, shipped = load_file(str(out)), load_file(str(cfg.run_dir / "student.safetensors"))
    assert exported.keys() == shipped.keys() and all(torch.equal(exported[k], shipped[k]) for k in shipped)


def test_export_needs_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("student: {name: resnet8}\ndata: {name: digits}\n")
    assert main(["export", str(run)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
