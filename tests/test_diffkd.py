"""DiffKD: the properties its spec pins (shared/methods/diffkd.md §8), plus a tiny digits run."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import teacher_changes, tiny_run
from distillab import methods, models
from distillab.config_files import load_config
from distillab.errors import ConfigError
from distillab.features import FeatureTap
from distillab.methods.diffkd import (
    DiffusionBranch,
    NoiseAdapter,
    blend_with_noise,
    ddim_step,
    denoising_timesteps,
    distance,
    linear_alphas_cumprod,
)
from distillab.run import train_run

DIGITS = (1, 8, 8)


def abar_by_hand(t: int) -> float:
    """ᾱ_t = Π_{s<=t} (1 − β_s), β_s = 1e-4 + s·(0.02 − 1e-4)/999."""
    return math.prod(1.0 - (1e-4 + s * (0.02 - 1e-4) / 999) for s in range(t + 1))


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = models.build("resnet14", num_classes=10, in_channels=1)
    student = models.build("resnet8", num_classes=10, in_channels=1)
    return teacher, student


def digits_batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *DIGITS, generator=g), torch.randint(0, 10, (n,), generator=g)


class ZeroNoise(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


# -- 1-4: the DDIM schedule ----------------------------------------------------------------------
def test_five_inference_steps_evaluate_timesteps_400_to_0():
    assert denoising_timesteps(5, 1000) == [400, 300, 200, 100, 0]
    assert [t for t, _, _ in DiffusionBranch(4, 4, "logits").schedule] == [400, 300, 200, 100, 0]


def test_timesteps_are_the_second_half_of_2n_evenly_spaced_ones():
    # n = 3: 2n = 6 steps of 1000 // 6 = 166: 830, 664, 498 | 332, 166, 0
    assert denoising_timesteps(3, 1000) == [332, 166, 0]
    # n = 1: 500 | 0
    assert denoising_timesteps(1, 1000) == [0]


def test_alphas_cumprod_match_the_linear_schedule():
    abar = linear_alphas_cumprod(1000)
    for t, expected in [(400, 0.1936), (300, 0.3940), (200, 0.6563), (100, 0.8951), (0, 0.9999)]:
        assert abs(abar[t].item() - expected) < 1e-3
        assert math.isclose(abar[t].item(), abar_by_hand(t), rel_tol=1e-9)


def test_each_step_goes_to_the_next_timestep_and_the_last_to_alpha_one():
    schedule = DiffusionBranch(4, 4, "logits").schedule
    for (_, _, abar_prev), (_, abar_next, _) in itertools.pairwise(schedule):
        assert abar_prev == abar_next
    assert schedule[-1][2] == 1.0


def test_ddim_step_against_a_hand_computation():
    a400, a300 = abar_by_hand(400), abar_by_hand(300)
    x, eps = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    x0 = (x - math.sqrt(1 - a400) * eps) / math.sqrt(a400)
    expected = math.sqrt(a300) * x0 + math.sqrt(1 - a300) * eps
    assert torch.allclose(ddim_step(x, eps, a400, a300), expected, rtol=1e-12)
    assert abs(expected[0].item() - 2.60203) < 1e-4  # (2 − 0.898014·0.5)/0.439968·0.627703 + 0.778453·0.5


def test_final_step_returns_the_x0_prediction():
    x, eps = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    expected = (x - math.sqrt(1e-4) * eps) / math.sqrt(0.9999)  # ᾱ_0 = 1 − β_0
    assert torch.allclose(ddim_step(x, eps, 0.9999, 1.0), expected, rtol=1e-12)


def test_zero_noise_predictor_chain_returns_x_over_sqrt_abar_400():
    branch = DiffusionBranch(8, 8, "feature")
    branch.phi = ZeroNoise()
    x = torch.randn(2, 8, 3, 3)
    out = branch.denoise(x)
    assert torch.allclose(out, x / math.sqrt(abar_by_hand(400)), rtol=1e-5, atol=0)
    assert torch.allclose(out, 2.2729 * x, rtol=1e-4, atol=0)


# -- 5: adaptive noise matching ------------------------------------------------------------------
def test_blend_gamma_one_keeps_the_student_and_gamma_zero_gives_the_noise():
    z, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(blend_with_noise(z, torch.ones(3), noise), z)
    assert torch.equal(blend_with_noise(z, torch.zeros(3), noise), noise)
    gamma = torch.tensor([0.25, 0.5, 0.75])
    mixed = blend_with_noise(z, gamma, noise)
    assert torch.allclose(mixed[2], 0.75 * z[2] + 0.25 * noise[2])


@pytest.mark.parametrize(("kind", "shape"), [("feature", (5, 16, 3, 3)), ("logits", (5, 16, 1, 1))])
def test_gamma_is_softmax_column_zero_of_a_two_way_linear_head(kind, shape):
    adapter = NoiseAdapter(16, kind).eval()
    z = torch.randn(*shape)
    gamma = adapter(z)
    assert gamma.shape == (5,) and bool(((gamma > 0) & (gamma < 1)).all())
    assert adapter.head.out_features == 2
    l0, l1 = adapter.head(adapter.features(z)).unbind(1)
    assert torch.allclose(gamma, 1 / (1 + torch.exp(l1 - l0)), atol=1e-6)


# -- 6: shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("ae", "width"), [(None, 16), (12, 12)])
def test_trans_gives_the_working_width_and_kd_compares_equal_shapes(ae, width):
    branch = DiffusionBranch(8, 16, "feature", ae_channels=ae)
    assert branch.trans(torch.randn(2, 8, 4, 4)).shape == (2, width, 4, 4)
    out = branch(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4))
    assert out.denoised.shape == out.target.shape == (2, width, 4, 4)


@pytest.mark.parametrize(("s_size", "t_size"), [(8, 4), (2, 4)])
def test_larger_map_is_pooled_to_the_smaller(s_size, t_size):
    branch = DiffusionBranch(8, 16, "feature")
    f_t = torch.randn(2, 16, t_size, t_size)
    out = branch(torch.randn(2, 8, s_size, s_size), f_t)
    small = min(s_size, t_size)
    assert out.denoised.shape == out.target.shape == (2, 16, small, small)
    assert torch.allclose(out.target, F.adaptive_avg_pool2d(f_t, small))


# -- 7, 8: gradient flow, the diffusion loss ---------------------------------------------------------
def grads(loss, module):
    return [g for g in torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True)
            if g is not None and g.abs().sum() > 0]


def test_gradient_flow_follows_the_spec():
    torch.manual_seed(0)
    branch = DiffusionBranch(8, 16, "feature", ae_channels=12)
    out = branch(torch.randn(4, 8, 4, 4), torch.randn(4, 16, 4, 4))
    kd = F.mse_loss(out.denoised, out.target)
    assert not out.target.requires_grad  # the AE latent is detached for the KD and diffusion targets
    assert grads(kd, branch.phi) and grads(out.diff_loss, branch.phi) and not grads(out.ae_loss, branch.phi)
    assert grads(out.ae_loss, branch.ae.encoder) and grads(out.ae_loss, branch.ae.decoder)
    assert not grads(kd, branch.ae) and not grads(out.diff_loss, branch.ae)
    for part in (branch.noise_adapter, branch.trans, branch.proj):
        assert grads(kd, part) and not grads(out.diff_loss, part) and not grads(out.ae_loss, part)


def test_kd_gradient_goes_through_all_five_denoising_steps():
    torch.manual_seed(0)
    branch = DiffusionBranch(8, 16, "feature")
    out = branch(torch.randn(4, 8, 4, 4), torch.randn(4, 16, 4, 4))
    (table,) = torch.autograd.grad(F.mse_loss(out.denoised, out.target), branch.phi.time_embedding.weight)
    assert table.abs().sum(1).nonzero().flatten().tolist() == [0, 100, 200, 300, 400]


def test_feature_kd_is_the_mse_between_the_denoised_student_and_the_teacher_prepool_map(pair):
    teacher, student = pair
    method = methods.build("diffkd", student, teacher, input_shape=DIGITS, logits=False).eval()
    x, y = digits_batch()
    torch.manual_seed(3)
    _, terms = method(x, y)
    torch.manual_seed(3)
    with FeatureTap(student, ["head.pre"]) as s_tap, FeatureTap(teacher, ["head.pre"]) as t_tap, torch.no_grad():
        student(x), teacher(x)
        out = method.feature_branch(s_tap["head.pre"], t_tap["head.pre"])
    assert set(terms) == {"ce", "kd_feature", "diff_feature"}
    assert torch.equal(out.target, t_tap["head.pre"])
    assert math.isclose(terms["kd_feature"].item(), ((out.denoised - out.target) ** 2).mean().item(), rel_tol=1e-5)
    assert math.isclose(terms["diff_feature"].item(), out.diff_loss.item(), rel_tol=1e-5)


def test_teacher_receives_no_gradient(pair):
    teacher, student = pair
    method = methods.build("diffkd", student, teacher, input_shape=DIGITS)
    _, terms = method(*digits_batch())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.feature_branch.noise_adapter.parameters())


class RecordingNoise(nn.Module):
    def forward(self, x, t):
        self.x, self.t = x, t
        return torch.full_like(x, 0.3)


def test_diffusion_loss_noises_the_teacher_latent_at_a_random_t_per_sample_and_targets_the_noise():
    branch = DiffusionBranch(8, 8, "feature")
    branch.phi = RecordingNoise()
    z = torch.randn(64, 8, 2, 2)
    torch.manual_seed(5)
    loss = branch.diffusion_loss(z)
    torch.manual_seed(5)
    t, noise = torch.randint(0, 1000, (64,)), torch.randn_like(z)  # the spec's order of draws
    assert torch.equal(branch.phi.t, t) and len(set(t.tolist())) > 50
    abar = torch.tensor([abar_by_hand(int(s)) for s in t]).view(-1, 1, 1, 1)
    assert torch.allclose(branch.phi.x, abar.sqrt() * z + (1 - abar).sqrt() * noise, atol=1e-5)
    assert math.isclose(loss.item(), ((0.3 - noise) ** 2).mean().item(), rel_tol=1e-5)
    branch.diffusion_loss(z)
    assert not torch.equal(branch.phi.t, t)  # fresh draws every call


# -- 9: the logits branch ----------------------------------------------------------------------------
def test_logits_kl_uses_tau_one_on_the_denoised_logits_and_ce_the_raw_ones(pair):
    teacher, student = pair
    method = methods.build("diffkd", student, teacher, input_shape=DIGITS, feature=False).eval()
    x, y = digits_batch()
    torch.manual_seed(3)
    logits, terms = method(x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        raw, t_logits = student(x), teacher(x)
        denoised = method.logit_branch(raw[..., None, None], t_logits[..., None, None]).denoised.flatten(1)
    p_t = t_logits.softmax(1)
    kl = (p_t * (p_t.log() - denoised.log_softmax(1))).sum(1).mean()
    assert set(terms) == {"ce", "kd_logits", "diff_logits"}
    assert torch.allclose(logits, raw)
    assert math.isclose(terms["kd_logits"].item(), kl.item(), rel_tol=1e-5)
    assert math.isclose(terms["ce"].item(), F.cross_entropy(raw, y).item(), rel_tol=1e-6)


def test_logits_branch_never_has_an_autoencoder(pair):
    teacher, student = pair
    method = methods.build("diffkd", student, teacher, input_shape=DIGITS, ae_channels=32)
    assert method.feature_branch.ae is not None and method.logit_branch.ae is None
    assert {"ae", "kd_feature", "diff_feature"} <= set(method(*digits_batch())[1])
    with pytest.raises(ValueError, match="feature branch only"):
        DiffusionBranch(10, 10, "logits", ae_channels=8)


def test_dist_distance_against_a_hand_computation():
    s, t = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]])

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        num = sum((u - ma) * (v - mb) for u, v in zip(a, b, strict=True))
        return num / (math.sqrt(sum((u - ma) ** 2 for u in a)) * math.sqrt(sum((v - mb) ** 2 for v in b)) + 1e-8)

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    ys, yt = [softmax(r) for r in s.tolist()], [softmax(r) for r in t.tolist()]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt, strict=True)) / 2
    intra = 1 - sum(pearson([r[c] for r in ys], [r[c] for r in yt]) for c in range(3)) / 3
    assert math.isclose(distance("dist", s[..., None, None], t[..., None, None], 1.0).item(), inter + intra,
                        rel_tol=1e-5)


def test_kl_on_maps_treats_each_position_as_a_sample():
    s, t = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    p_t = t.softmax(1)
    expected = (p_t * (p_t.log() - s.log_softmax(1))).sum(1).mean()
    assert math.isclose(distance("kl", s, t, 1.0).item(), expected.item(), rel_tol=1e-5)


# -- 10: extra parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "expected"), [
    ((256, 256, "feature"), 694_722),  # resnet32x4 -> resnet8x4
    ((64, 64, "feature"), 105_906),  # resnet56 -> resnet20
    ((100, 100, "logits"), 352_302),  # CIFAR-100 logits
    ((512, 512, "feature", 1024), 7_644_418),  # ResNet-34 -> ResNet-18 with AE 1024
    ((1000, 1000, "logits"), 23_323_002),  # ImageNet logits
])
def test_extra_parameter_counts_match_the_official_modules(args, expected):
    assert param_count(DiffusionBranch(*args)) == expected


def test_feature_branch_parameters_for_small_channels_by_hand():
    # C = 8, Cs = 4, no AE. trans 4·8+8 = 40. Φ: table 1280·8 = 10240; Bottleneck(8, r=4), width 2:
    # (8·2+2) + 4 + (2·2·9+2) + 4 + (2·8+8) + 16 = 104, twice; conv 8·8+8 = 72; BN 16 → 10536.
    # adapter: Bottleneck(8, r=8), width 1: (8+1) + 2 + (9+1) + 2 + (8+8) + 16 = 55; Linear 8·2+2 = 18 → 73.
    # proj 72 + 16 = 88. Total 40 + 10536 + 73 + 88 = 10737.
    assert param_count(DiffusionBranch(4, 8, "feature")) == 10_737


def test_method_side_parameters_for_resnet32x4_to_resnet8x4():
    teacher, student = models.build("resnet32x4", num_classes=100), models.build("resnet8x4", num_classes=100)
    assert methods.build("diffkd", student, teacher).side_parameter_count() == 694_722 + 352_302


# -- 11: the deployed student; options ---------------------------------------------------------------
def test_deployed_student_is_the_plain_student_with_unchanged_flops(pair):
    teacher, student = pair
    method = methods.build("diffkd", student, teacher, input_shape=DIGITS)
    deployed = method.deploy()
    fresh = models.build("resnet8", num_classes=10, in_channels=1)
    assert list(deployed.state_dict()) == list(fresh.state_dict())
    x = torch.randn(2, *DIGITS)
    flops = []
    for net in (deployed.eval(), fresh.eval()):
        with FlopCounterMode(display=False) as counter:
            net(x)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_both_branches_off_is_a_config_error(pair):
    teacher, student = pair
    with pytest.raises(ConfigError, match=r"method\.options.*switch on at least one branch"):
        methods.build("diffkd", student, teacher, feature=False, logits=False)


def test_other_models_must_name_the_feature_layer(pair):
    teacher, _ = pair
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ConfigError, match=r"method\.options\.student_layer"):
        methods.build("diffkd", student, teacher, input_shape=DIGITS)
    method = methods.build("diffkd", student, teacher, input_shape=DIGITS, student_layer="0")
    assert method.feature_branch.trans.in_channels == 4


# -- a tiny real run ------------------------------------------------------------------------------------
def test_digits_run_trains_and_ships_the_plain_student(tmp_path, digits_teacher):
    cfg = tiny_run(tmp_path, "diffkd", "data.val_size=200", "data.train_subset=500", "train.epochs=3",
                   "train.schedule.name=cosine", "method.name=diffkd", *teacher_changes(digits_teacher))
    summary = train_run(cfg)
    assert summary["test_acc"] > 30.0  # chance is 10%
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    shipped = load_file(str(cfg.run_dir / "student.safetensors"))
    assert set(shipped) == set(models.build("resnet8", num_classes=10, in_channels=1).state_dict())


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_cifar_configs_cover_the_papers_pairs_with_recipe_a1():
    pairs = {"wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet32x4_resnet8x4", "ResNet50_mobile_half",
             "resnet32x4_ShuffleV1", "resnet32x4_ShuffleV2"}
    files = {p.stem: p for p in (CONFIGS / "cifar100" / "diffkd").glob("*.yaml")}
    assert set(files) == pairs
    for stem, path in files.items():
        cfg = load_config(path)
        assert f"{cfg.teacher.name}_{cfg.student.name}" == stem and cfg.method.name == "diffkd"
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.optim.lr, cfg.train.optim.weight_decay) == (
            240, 64, 0.05, 5e-4)
        assert cfg.train.schedule.milestones == [150, 180, 210]
    assert load_config(CONFIGS / "fashion_mnist" / "diffkd.yaml").method.name == "diffkd"


def test_the_plain_kd_control_adds_hintons_term_on_the_raw_logits(pair):
    """`plain_kd_weight` (not in the paper): w * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean, by hand."""
    teacher, student = pair
    torch.manual_seed(0)
    method = methods.build("diffkd", student, teacher, input_shape=(1, 8, 8), logits=False, plain_kd_weight=0.5,
                           plain_kd_temperature=2.0)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    logits, terms = method(x, y)
    assert set(terms) == {"ce", "kd_feature", "diff_feature", "kd"}
    with torch.no_grad():
        t = teacher(x)
    p_t, p_s = (z.div(2.0).softmax(1) for z in (t, logits.detach()))
    by_hand = 0.5 * 4.0 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert terms["kd"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert "kd" not in methods.build("diffkd", student, teacher, input_shape=(1, 8, 8))(x, y)[1]
