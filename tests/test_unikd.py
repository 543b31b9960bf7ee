"""UniKD (spec: shared/methods/unikd.md): Gaussian KL, AFF chain and shapes, FDP sampling, losses, export."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import teacher_changes, tiny_run
from distillab import methods, models
from distillab.config_files import load_config
from distillab.engine.evaluate import eval_loader
from distillab.errors import ConfigError
from distillab.features import FeatureTap
from distillab.losses import dkd_loss, gaussian_kl, kd_loss
from distillab.methods import unikd
from distillab.methods.reviewkd import gated_sum
from distillab.methods.unikd import AdaptiveFeatureFusion, GaussianHead, UniKD
from distillab.run import restore_method, train_run

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CONFIGS = sorted((ROOT / "configs/cifar100/unikd").glob("*.yaml"))
VARIANT_B_CONFIGS = sorted((ROOT / "configs/cifar100/unikd_mlkd").glob("[!_]*.yaml"))
FASHION_CONFIGS = sorted((ROOT / "configs/fashion_mnist").glob("unikd*.yaml"))


def normal_kl_reference(mean_p, log_var_p, mean_q, log_var_q):
    p = torch.distributions.Normal(mean_p, torch.exp(0.5 * log_var_p))
    q = torch.distributions.Normal(mean_q, torch.exp(0.5 * log_var_q))
    return torch.distributions.kl_divergence(p, q).sum(1).mean()


def random_gaussians(seed, batch=3, dims=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dims, generator=g) * s for s in (1.0, 0.5, 1.0, 0.5)]


# -- closed-form Gaussian KL ------------------------------------------------------------------------
def test_gaussian_kl_of_a_one_dimensional_pair_by_hand():
    # p = N(1, 1), q = N(0, 4): ln(2/1) + (1 + 1) / (2 * 4) - 1/2 = ln 2 - 0.25; second row identical: 0.
    kl = gaussian_kl(torch.tensor([[1.0], [0.3]]), torch.tensor([[0.0], [0.2]]),
                     torch.tensor([[0.0], [0.3]]), torch.tensor([[math.log(4.0)], [0.2]]))
    assert kl.item() == pytest.approx((math.log(2.0) - 0.25) / 2, abs=1e-6)


def test_gaussian_kl_sums_dimensions_and_averages_the_batch_like_independent_normals():
    args = random_gaussians(0)
    assert torch.allclose(gaussian_kl(*args), normal_kl_reference(*args), atol=1e-5)


def test_gaussian_kl_equals_a_monte_carlo_estimate():
    mean_p, log_var_p, mean_q, log_var_q = random_gaussians(1)
    g = torch.Generator().manual_seed(2)
    samples = mean_p + torch.exp(0.5 * log_var_p) * torch.randn(200_000, *mean_p.shape, generator=g)
    p = torch.distributions.Normal(mean_p, torch.exp(0.5 * log_var_p))
    q = torch.distributions.Normal(mean_q, torch.exp(0.5 * log_var_q))
    estimate = (p.log_prob(samples) - q.log_prob(samples)).sum(-1).mean()
    exact = gaussian_kl(mean_p, log_var_p, mean_q, log_var_q)
    assert exact.item() == pytest.approx(estimate.item(), rel=0.02, abs=0.01)


def test_gaussian_kl_is_zero_only_for_identical_gaussians_and_depends_on_direction():
    mean, log_var, other_mean, other_log_var = random_gaussians(3)
    assert gaussian_kl(mean, log_var, mean, log_var).item() == pytest.approx(0.0, abs=1e-7)
    assert gaussian_kl(mean, log_var, other_mean, log_var) > 1e-3
    assert gaussian_kl(mean, log_var, mean, other_log_var) > 1e-3
    forward, backward = gaussian_kl(mean, log_var, mean, other_log_var), gaussian_kl(mean, other_log_var, mean, log_var)
    assert not torch.isclose(forward, backward)


# -- FDP ----------------------------------------------------------------------------------------------
def test_fdp_sample_is_the_mean_when_the_noise_is_zero():
    head = GaussianHead(8, 5)
    feature = torch.randn(2, 8, 3, 3)
    z, mean, _ = head(feature, noise=torch.zeros(2, 5))
    assert torch.equal(z, mean)
    assert torch.allclose(mean, head.mean(feature.mean(dim=(2, 3))))


def test_fdp_samples_have_the_predicted_mean_and_variance():
    torch.manual_seed(0)
    head = GaussianHead(3, 4)
    z, mean, log_var = head(torch.randn(1, 3, 1, 1).expand(1_000_000, 3, 1, 1))
    with torch.no_grad():
        std = torch.exp(0.5 * log_var[0])
        assert torch.all((z.mean(0) - mean[0]).abs() < 0.01 * std)
        assert torch.allclose(z.var(0), std**2, rtol=0.01)


# -- AFF ----------------------------------------------------------------------------------------------
def meta_method(teacher, student, num_classes=100, input_shape=(3, 32, 32), **options):
    """A method on the meta device: shapes and parameter counts without any computation."""
    with torch.device("meta"):
        t = models.build(teacher, num_classes=num_classes, in_channels=input_shape[0])
        s = models.build(student, num_classes=num_classes, in_channels=input_shape[0])
        return UniKD(s, t, input_shape=input_shape, **options)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("pair", "side", "aff"), [
    (("resnet32x4", "resnet8x4"), 1_831_318, 1_805_318),
    (("resnet56", "resnet20"), 120_214, None),
    (("wrn_40_2", "wrn_16_2"), 465_302, None),
])
def test_extra_parameters_match_the_author_modules(pair, side, aff):
    method = meta_method(*pair)
    assert method.side_parameter_count() == side
    assert aff is None or count(method.aff) == aff


def test_prune_unused_drops_the_deeper_projections():
    assert meta_method("resnet32x4", "resnet8x4", prune_unused=True).side_parameter_count() == 356_758


def config_pair(path):
    cfg = load_config(path)
    return cfg.teacher.name, cfg.student.name, cfg.method.options


@pytest.mark.parametrize("path", CIFAR_CONFIGS + VARIANT_B_CONFIGS + FASHION_CONFIGS,
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fusion_output_matches_the_teacher_feature_for_every_configured_pair(path):
    teacher, student, options = config_pair(path)
    classes, shape = (10, (1, 28, 28)) if path in FASHION_CONFIGS else (100, (3, 32, 32))
    method = meta_method(teacher, student, classes, shape, **options)
    with torch.device("meta"):
        x = torch.zeros(2, *method.input_shape)
        method.student(x)
        method.teacher(x)
        fused = method.aff(method.student_tap.take())
        (teacher_feature,) = method.teacher_tap.take()
        z_s, z_t = method.fdp_student(fused)[0], method.fdp_teacher(teacher_feature)[0]
    stage_one = method.shapes(method.teacher, ["stages.0"])["stages.0"]
    assert tuple(teacher_feature.shape[1:]) == stage_one  # stage-1 pre-activation: same shape as the output
    assert fused.shape == teacher_feature.shape
    assert z_s.shape == z_t.shape == (2, classes)
    assert method.aff.mid_channels == min(512, method.aff.levels[-1].adjust[0].in_channels)


def test_resnet32x4_to_resnet8x4_levels_and_mid_width():
    method = meta_method("resnet32x4", "resnet8x4")
    shapes = method.shapes(method.student, method.student_tap.names)
    assert list(shapes.values())[::-1] == [(256,), (256, 8, 8), (128, 16, 16), (64, 32, 32)]
    assert method.aff.mid_channels == 256
    assert method.aff.out_size == (32, 32) and method.aff.levels[0].project[0].out_channels == 64


def test_dkd_beta_per_cifar_pair_follows_the_spec():
    beta = {path.stem: config_pair(path)[2].get("nckd_weight") for path in CIFAR_CONFIGS}
    assert beta == {
        "resnet32x4_resnet8x4": 8, "resnet56_resnet20": 2, "resnet110_resnet32": 2, "vgg13_vgg8": 6,
        "wrn_40_2_wrn_16_2": 6, "wrn_40_2_wrn_40_1": 6, "vgg13_mobile_half": 6, "resnet32x4_ShuffleV1": 8,
        "resnet32x4_ShuffleV2": 8, "wrn_40_2_ShuffleV1": 8, "ResNet50_mobile_half": 8,
    }


def gate_inputs(fusion, features, monkeypatch):
    """Per level (shallowest first): the adjusted map, the upsampled map the gate sees, and the gate."""
    seen, level_of = {}, {level.gate: k for k, level in enumerate(fusion.levels) if level.gate is not None}
    hooks = [level.adjust.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(("a", k), o))
             for k, level in enumerate(fusion.levels)]

    def recording_gated_sum(gate, x, other):
        k = level_of[gate]
        seen["x", k], seen["up", k] = x, other
        seen["g", k] = torch.sigmoid(gate(torch.cat([x, other], dim=1)))
        return gated_sum(gate, x, other)

    monkeypatch.setattr(unikd, "gated_sum", recording_gated_sum)
    fusion(features)
    for h in hooks:
        h.remove()
    return seen


def small_fusion(fuse_with):
    torch.manual_seed(0)
    fusion = AdaptiveFeatureFusion([4, 6, 8, 8], [5, 5, 5, 5], (8, 8), fuse_with=fuse_with)
    features = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2), torch.randn(2, 8)]
    return fusion, features


def test_each_gate_mixes_in_the_previous_level_upsampled(monkeypatch):
    fusion, features = small_fusion("previous")
    seen = gate_inputs(fusion, features, monkeypatch)
    mixed = {3: seen[("a", 3)]}  # the deepest level is not gated
    for k in (2, 1, 0):
        a, up = seen[("x", k)], seen[("up", k)]
        assert torch.equal(a, seen[("a", k)])
        torch.testing.assert_close(up, F.interpolate(mixed[k + 1], size=a.shape[-2:], mode="nearest"))
        g = seen[("g", k)]
        assert g.shape[1] == 2 and torch.all((g > 0) & (g < 1))
        mixed[k] = a * g[:, 0:1] + up * g[:, 1:2]


def test_fuse_with_deepest_gives_every_gate_the_deepest_map(monkeypatch):
    fusion, features = small_fusion("deepest")
    seen = gate_inputs(fusion, features, monkeypatch)
    deepest = seen[("a", 3)]
    assert deepest.shape[-2:] == (1, 1)
    for k in (2, 1, 0):
        up = seen[("up", k)]
        assert torch.equal(up, deepest.expand_as(up))


def test_only_the_gate_conv_has_a_bias_and_deeper_projections_get_no_gradient():
    fusion, features = small_fusion("previous")
    for level in fusion.levels:
        assert level.adjust[0].bias is None and level.project[0].bias is None
        assert level.gate is None or level.gate.bias is not None
    fusion(features).square().mean().backward()
    assert fusion.levels[0].project[0].weight.grad.abs().sum() > 0
    for level in fusion.levels[1:]:
        assert level.project[0].weight.grad is None
        assert level.adjust[0].weight.grad.abs().sum() > 0


def test_bn_form_puts_batchnorm_after_both_convs():
    fusion = AdaptiveFeatureFusion([4, 8], [5, 5], (4, 4), act="bn")
    assert all(isinstance(level.adjust[1], torch.nn.BatchNorm2d) for level in fusion.levels)
    assert isinstance(fusion.levels[0].project[1], torch.nn.BatchNorm2d)


# -- the method on a small real pair -----------------------------------------------------------------
@pytest.fixture
def digits_pair():
    torch.manual_seed(0)
    return (models.build("resnet14", num_classes=10, in_channels=1),
            models.build("resnet8", num_classes=10, in_channels=1))


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def build(pair, **options):
    teacher, student = pair
    return UniKD(student, teacher, input_shape=(1, 8, 8), **options)


def grads(module):
    return [p.grad for p in module.parameters()]


def has_grad(module):
    return all(g is not None and g.abs().sum() > 0 for g in grads(module))


def test_teacher_feature_is_stage_one_before_its_final_relu(digits_pair):
    method = build(digits_pair)
    x, _ = batch()
    assert method.teacher_tap.names == ["stages.0.1.relu:input"]
    with torch.no_grad():
        stage_one = method.teacher.stages[0](method.teacher.stem(x))
        method.teacher(x)
    (feature,) = method.teacher_tap.take()
    assert feature.min() < 0 and torch.equal(F.relu(feature), stage_one)


def test_wrn_teacher_feature_is_the_next_blocks_batchnorm_of_stage_one():
    with torch.device("meta"):
        teacher, student = models.build("wrn_40_2"), models.build("wrn_16_2")
        assert UniKD(student, teacher).teacher_tap.names == ["stages.1.0.relu1:input"]


def test_teacher_without_a_single_pre_relu_stage_map_gives_its_stage_output():
    """ShuffleV2's ReLU sees half its map, a transformer has none: the stage output itself, as stage_preacts."""
    with torch.device("meta"):
        assert UniKD(models.build("resnet8"), models.build("ShuffleV2")).teacher_tap.names == ["stages.0"]
        assert UniKD(models.build("resnet8"), models.build("vit_tiny")).teacher_tap.names == ["stages.0"]


@pytest.mark.parametrize("kl", ["sampled", "closed_form"])
def test_feature_term_reaches_both_fdp_heads_and_the_fusion_not_the_teacher(digits_pair, kl):
    method = build(digits_pair, kl=kl)
    _, terms = method(*batch())
    terms["feat"].backward()
    for module in (method.fdp_student.mean, method.fdp_student.log_var, method.fdp_teacher.mean,
                   method.fdp_teacher.log_var, method.aff.levels[0].project):
        assert has_grad(module)
    assert all(p.grad is None for p in method.teacher.parameters())
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert all(id(p) in trainable for p in method.fdp_teacher.parameters())


def test_supp_term_reaches_the_student_logits_unless_targets_are_detached(digits_pair):
    method = build(digits_pair)
    _, terms = method(*batch())
    terms["supp"].backward()
    assert has_grad(method.student.head.fc) and has_grad(method.fdp_teacher)


def test_detached_targets_stop_gradients_through_z_t_and_the_student_logits(digits_pair):
    method = build(digits_pair, detach_targets=True)
    _, terms = method(*batch())
    terms["feat"].backward(retain_graph=True)
    assert all(g is None for g in grads(method.fdp_teacher)) and has_grad(method.fdp_student)
    method.zero_grad(set_to_none=True)
    terms["supp"].backward()
    assert all(g is None for g in grads(method.student.head.fc))


@pytest.mark.parametrize("direction", ["t_to_s", "s_to_t"])
def test_closed_form_term_is_the_gaussian_kl_of_the_heads(digits_pair, direction):
    method = build(digits_pair, kl="closed_form", kl_direction=direction, feat_weight=0.5).eval()
    x, y = batch()
    _, terms = method(x, y)
    with torch.no_grad():
        method.teacher(x)
        method.student(x)
        fused = method.aff(method.student_tap.take())
        _, mean_s, log_var_s = method.fdp_student(fused)
        _, mean_t, log_var_t = method.fdp_teacher(method.teacher_tap.take()[0])
    s, t = (mean_s, log_var_s), (mean_t, log_var_t)
    expected = gaussian_kl(*t, *s) if direction == "t_to_s" else gaussian_kl(*s, *t)
    assert torch.allclose(terms["feat"], 0.5 * expected, atol=1e-6)


def test_logvar_clamp_must_be_an_interval(digits_pair):
    with pytest.raises(ConfigError, match=r"method\.options\.logvar_clamp"):
        build(digits_pair, logvar_clamp=(2.0, -2.0))


@pytest.mark.parametrize(("epoch", "ramp"), [(0, 0.05), (9, 0.5), (19, 1.0), (30, 1.0)])
def test_dkd_logit_term_is_dkd_loss_with_the_linear_warmup(digits_pair, epoch, ramp):
    method = build(digits_pair, logit_loss="dkd", tckd_weight=1.0, nckd_weight=2.0, temperature=4.0).eval()
    method.set_progress(epoch, 40)
    x, y = batch()
    logits, terms = method(x, y)
    with torch.no_grad():
        teacher_logits = method.teacher(x)
    assert set(terms) == {"ce", "dkd", "feat", "supp"}
    assert torch.allclose(terms["dkd"], ramp * dkd_loss(logits, teacher_logits, y, 1.0, 2.0, 4.0))
    assert not torch.allclose(terms["dkd"], ramp * kd_loss(logits, teacher_logits, 4.0))
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, y))


def test_kd_logit_term_is_kd_loss(digits_pair):
    method = build(digits_pair, logit_loss="kd", warmup=0, logit_weight=0.9, temperature=2.0).eval()
    x, y = batch()
    logits, terms = method(x, y)
    with torch.no_grad():
        teacher_logits = method.teacher(x)
    assert torch.allclose(terms["kd"], 0.9 * kd_loss(logits, teacher_logits, 2.0))


def test_sampled_term_is_the_softmax_kl_of_the_samples_at_t_prime(digits_pair):
    method = build(digits_pair, dist_temperature=2.0).eval()
    x, y = batch()
    torch.manual_seed(5)
    _, terms = method(x, y)
    with torch.no_grad():
        method.teacher(x)
        method.student(x)
        fused = method.aff(method.student_tap.take())
        torch.manual_seed(5)  # the same noise draws, in the same order
        z_s = method.fdp_student(fused)[0]
        z_t = method.fdp_teacher(method.teacher_tap.take()[0])[0]
    assert torch.allclose(terms["feat"], kd_loss(z_s, z_t, 2.0), atol=1e-6)


def test_exported_student_is_the_plain_zoo_model(digits_pair):
    method = build(digits_pair)
    shipped = method.deploy()
    fresh = models.build("resnet8", num_classes=10, in_channels=1)
    assert list(shipped.state_dict()) == list(fresh.state_dict())
    assert count(shipped) == count(fresh)
    assert method.side_parameter_count() > 0


def test_non_zoo_student_needs_its_layers_named():
    teacher = models.build("resnet14", num_classes=10, in_channels=1)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    with pytest.raises(ConfigError, match=r"method\.options\.student_layers"):
        UniKD(student, teacher, input_shape=(1, 8, 8))


# -- a tiny real run ----------------------------------------------------------------------------------
# the whole training split less 200 for validation, cosine schedule
RUN = ("data.val_size=200", "data.train_subset=", "train.schedule.name=cosine")


def test_tiny_digits_run_trains(tmp_path, digits_teacher):
    cfg = tiny_run(tmp_path, "unikd", *RUN, "method.name=unikd", "train.epochs=3", "method.options.warmup=1",
                   *teacher_changes(digits_teacher))
    summary = train_run(cfg)
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_dkd", "loss_feat", "loss_supp"} <= set(lines[0])
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["loss_ce"] < lines[0]["loss_ce"]
    assert summary["test_acc"] > 30.0  # chance is 10%


def test_with_its_feature_terms_at_zero_unikd_trains_the_student_exactly_as_dkd():
    """The ablation unikd_no_feat must reproduce dkd: same loss and the same gradient on every student weight."""
    grads = {}
    for name, options in (("dkd", {"nckd_weight": 2.0, "warmup": 2}),
                          ("unikd", {"nckd_weight": 2.0, "warmup": 2, "feat_weight": 0.0, "supp_weight": 0.0})):
        torch.manual_seed(0)
        student = models.build("resnet8", num_classes=10, in_channels=1)
        torch.manual_seed(1)
        teacher = models.build("resnet14", num_classes=10, in_channels=1)
        method = methods.build(name, student, teacher, input_shape=(1, 16, 16), **options)
        method.set_progress(0, 10)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        _, terms = method(x, y)
        sum(terms.values()).backward()
        grads[name] = {k: p.grad.clone() for k, p in student.named_parameters()}
        grads[name + "_loss"] = sum(terms.values()).item()
    assert grads["unikd_loss"] == pytest.approx(grads["dkd_loss"], rel=1e-6)
    for key, value in grads["dkd"].items():
        torch.testing.assert_close(grads["unikd"][key], value, rtol=1e-5, atol=1e-7)


def test_with_its_feature_terms_at_zero_a_unikd_run_ends_with_dkds_weights_bit_for_bit(tmp_path, digits_teacher):
    """Through the engine (both read the cached teacher; unikd its features too): the trained students are
    identical, so any gap between unikd_no_feat and dkd in a table is not a coupling of the side modules."""
    weights, cache_s = {}, {}
    for name, extra in (("dkd", []), ("unikd", ["method.options.feat_weight=0", "method.options.supp_weight=0"])):
        cfg = tiny_run(tmp_path, name, *RUN, f"method.name={name}", "train.epochs=2", "data.augment.crop_padding=0",
                       "method.options.nckd_weight=2", "method.options.warmup=2", *teacher_changes(digits_teacher),
                       *extra)
        cache_s[name] = train_run(cfg).get("teacher_cache_s")
        weights[name] = load_file(cfg.run_dir / "student.safetensors")
    assert cache_s["dkd"] is not None and cache_s["unikd"] is not None
    assert weights["dkd"].keys() == weights["unikd"].keys()
    for key, value in weights["dkd"].items():
        assert torch.equal(weights["unikd"][key], value), key


# -- the probe: do the FDP heads agree with the teacher? ----------------------------------------------------
PROBES = ("val_probe_teacher_agree", "val_probe_student_agree", "val_probe_logits_agree")


def agreement(method: UniKD, images: torch.Tensor) -> dict[str, float]:
    """The probe computed directly, in eval mode: the argmax of each head's mean layer on its pooled map (and of
    the student's logits) against the teacher's top-1 class, in % of `images`."""
    method.eval()
    with torch.no_grad(), FeatureTap(method.teacher, method.teacher_tap.names) as t_tap, \
            FeatureTap(method.student, method.student_tap.names) as s_tap:
        top = method.teacher(images).argmax(1)
        logits = method.student(images)
        teacher_mean = method.fdp_teacher.mean(t_tap.values()[0].mean(dim=(2, 3)))
        student_mean = method.fdp_student.mean(method.aff(s_tap.values()).mean(dim=(2, 3)))
    return {name: 100.0 * (score.argmax(1) == top).sum().item() / len(images)
            for name, score in zip(PROBES, (teacher_mean, student_mean, logits), strict=True)}


def test_each_validation_reports_how_often_the_fdp_heads_agree_with_the_teacher(tmp_path, digits_teacher):
    cfg = tiny_run(tmp_path, "probe", *RUN, "method.name=unikd", "train.epochs=3", "train.eval_every=2",
                   "method.options.warmup=1", "data.augment.crop_padding=0", *teacher_changes(digits_teacher))
    summary = train_run(cfg)
    assert summary["teacher_cache_s"] is not None  # trained from the cache: the probe must run the real teacher
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [all(k in line for k in PROBES) for line in lines] == [False, True, True]  # the evaluated epochs: 2, 3
    assert not any(k.startswith("test_probe") for line in lines for k in line)
    for line in lines[1:]:
        for k in PROBES:
            assert 0.0 <= line[k] <= 100.0 and (line[k] * 2).is_integer()  # % of 200 validation images
    _, data, method, _ = restore_method(cfg.run_dir)  # the state of the last epoch
    images = torch.cat([b.images for b in eval_loader(data.val)])
    assert len(images) == 200
    assert agreement(method, images) == pytest.approx({k: lines[-1][k] for k in PROBES}, abs=1e-9)


def test_no_validation_split_no_probe(tmp_path, digits_teacher):
    cfg = tiny_run(tmp_path, "no_val", "method.name=unikd", "data.val_size=0", *teacher_changes(digits_teacher))
    train_run(cfg)
    (line,) = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "test_acc" in line and not any("probe" in k for k in line)


def test_probe_gives_one_value_per_image_and_draws_no_noise(digits_pair):
    method = build(digits_pair).eval()
    x, y = batch()
    torch.manual_seed(0)
    values = method.probe(x, y)
    after = torch.randn(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.randn(3))  # the training's random stream is left where it was
    assert set(values) == set(UniKD.probes) and all(v.shape == (len(x),) for v in values.values())
    assert all(set(v.unique().tolist()) <= {0.0, 100.0} for v in values.values())

