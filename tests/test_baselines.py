"""The baselines (AT, DKD, DIST, CRD, ReviewKD, SP, PKT, RKD, VID): losses on small fixed tensors against values
worked out by hand from each paper's formula, the spec's identities, CRD's memory bank, ReviewKD's shapes on
the CIFAR-100 pairs, and tiny digits runs through the trainer."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import teacher_changes, tiny_run
from distillab import methods, models
from distillab.config_files import load_config
from distillab.data.base import ImageDataset
from distillab.data.loader import DeviceLoader
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from distillab.errors import ConfigError, MissingInputError
from distillab.features import FeatureTap
from distillab.losses import (
    at_loss,
    attention_map,
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    hcl_level,
    kd_loss,
    nce_loss,
    pearson_rows,
    warmup_factor,
)
from distillab.methods.crd import ContrastMemory, sample_contrast_indices
from distillab.methods.pkt import pkt_loss
from distillab.methods.reviewkd import gated_sum
from distillab.methods.rkd import rkd_terms
from distillab.methods.sp import sp_loss
from distillab.methods.vid import VIDRegressor
from distillab.roles import roles
from distillab.run import load_run_config, train_run

BASELINES = ["at", "dkd", "dist", "crd", "reviewkd", "sp", "pkt", "rkd", "vid"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def logits_of(*rows):
    """Logits whose softmax (at T = 1) is each row, given as probabilities."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(methods.available())


# -- DKD ------------------------------------------------------------------------------------------
def test_dkd_terms_match_the_hand_computation():
    # p_s = [.25, .5, .25], p_t = [.5, .25, .25], target 0. Binary: [.5, .5] vs [.25, .75].
    # Non-target: teacher [.25, .25] / .5 = [.5, .5]; student [.5, .25] / .75 = [2/3, 1/3].
    s, t, y = logits_of([0.25, 0.5, 0.25]), logits_of([0.5, 0.25, 0.25]), torch.tensor([0])
    tckd, nckd = dkd_terms(s, t, y, temperature=1.0)
    assert tckd.item() == pytest.approx(kl([0.5, 0.5], [0.25, 0.75]), abs=1e-6)
    assert nckd.item() == pytest.approx(kl([0.5, 0.5], [2 / 3, 1 / 3]), abs=1e-6)
    # The same probabilities at T = 4 (logits x 4) carry the factor T^2 = 16.
    expected = 16 * (1.0 * kl([0.5, 0.5], [0.25, 0.75]) + 8.0 * kl([0.5, 0.5], [2 / 3, 1 / 3]))
    assert dkd_loss(4 * s, 4 * t, y, alpha=1.0, beta=8.0, temperature=4.0).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_split_recovers_kd_per_sample():
    # DKD paper, eq. (1): KD = TCKD + (1 - p_t,g) NCKD, all with the T^2 factor.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    y = torch.randint(0, 10, (6,), generator=g)
    for b in range(6):
        tckd, nckd = dkd_terms(s[b : b + 1], t[b : b + 1], y[b : b + 1], temperature=4.0)
        p_target = F.softmax(t[b] / 4.0, dim=0)[y[b]]
        kd = kd_loss(s[b : b + 1], t[b : b + 1], temperature=4.0)
        assert (tckd + (1 - p_target) * nckd).item() == pytest.approx(kd.item(), abs=1e-5)


def test_dkd_warmup_is_linear_over_20_epochs_counted_from_1():
    assert warmup_factor(0, 20) == pytest.approx(0.05)  # the first epoch (0-based epoch 0)
    assert warmup_factor(9, 20) == pytest.approx(0.5)
    assert warmup_factor(19, 20) == 1.0 and warmup_factor(200, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0


def test_dkd_method_applies_the_warmup_to_both_terms(pair, batch):
    teacher, student = pair
    method = methods.build("dkd", student, teacher, input_shape=(1, 28, 28))
    images, labels = batch
    _, early = method(images, labels)
    method.set_progress(19, 240)
    _, late = method(images, labels)
    assert early["tckd"].item() == pytest.approx(0.05 * late["tckd"].item(), rel=1e-5)
    assert early["nckd"].item() == pytest.approx(0.05 * late["nckd"].item(), rel=1e-5)
    _, nckd = dkd_terms(student(images), teacher(images), labels, 4.0)
    assert late["nckd"].item() == pytest.approx(8.0 * nckd.item(), rel=1e-5)


# -- AT -------------------------------------------------------------------------------------------
def test_at_loss_matches_the_hand_computation():
    # Student: both channels [[1, 0], [0, 0]] -> map [1, 0, 0, 0]. Teacher: both [[1, 1], [0, 0]] ->
    # [1, 1, 0, 0] / sqrt(2). Squared difference: (1 - 1/sqrt 2)^2 + 1/2 = 2 - sqrt 2, mean over 4 pixels.
    f_s = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(1, 2, 2, 2)
    f_t = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).expand(1, 2, 2, 2)
    assert at_loss(f_s, f_t).item() == pytest.approx((2 - math.sqrt(2)) / 4, abs=1e-6)


def test_attention_maps_are_unit_norm_and_the_loss_ignores_per_sample_scale():
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(3, 8, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    assert torch.allclose(attention_map(f_s).norm(dim=1), torch.ones(3))
    scale = torch.tensor([0.1, 3.0, 40.0]).view(3, 1, 1, 1)
    assert at_loss(f_s * scale, f_t).item() == pytest.approx(at_loss(f_s, f_t).item(), rel=1e-5)
    assert at_loss(f_s, f_t / scale).item() == pytest.approx(at_loss(f_s, f_t).item(), rel=1e-5)


def test_at_pools_the_larger_map_to_the_smaller():
    g = torch.Generator().manual_seed(1)
    big, small = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 6, 16, 16, generator=g)
    pooled = F.avg_pool2d(big, 2)
    assert at_loss(big, small).item() == pytest.approx(at_loss(pooled, small).item(), rel=1e-6)
    assert at_loss(small, big).item() == pytest.approx(at_loss(small, pooled).item(), rel=1e-6)


def test_at_method_sums_every_stage_pair_with_weight_1000(pair, batch):
    teacher, student = pair
    method = methods.build("at", student, teacher, input_shape=(1, 28, 28))
    images, labels = batch
    _, terms = method(images, labels)
    with torch.no_grad():
        expected = 0.0
        for s_name, t_name in zip(roles(student).stage_names, roles(teacher).stage_names, strict=True):
            with FeatureTap(student, [s_name]) as ts, FeatureTap(teacher, [t_name]) as tt:
                student(images), teacher(images)
                expected += at_loss(ts[s_name], tt[t_name]).item()
    assert terms["at"].item() == pytest.approx(1000 * expected, rel=1e-5)


# -- DIST -----------------------------------------------------------------------------------------
def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (den + 1e-8)


def test_pearson_of_a_hand_example():
    # a - mean = [-1, 0, 1], b - mean = [-4/3, -1/3, 5/3]: dot 3, norms sqrt 2 and sqrt(42)/3.
    rho = pearson_rows(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 4.0]]))
    assert rho.item() == pytest.approx(9 / math.sqrt(84), abs=1e-6)


def test_dist_matches_the_hand_computation_rows_and_columns():
    y_s = [[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]]
    y_t = [[0.1, 0.3, 0.6], [0.6, 0.1, 0.3]]
    inter = 1 - (pearson(y_s[0], y_t[0]) + pearson(y_s[1], y_t[1])) / 2
    columns = [([r[c] for r in y_s], [r[c] for r in y_t]) for c in range(3)]
    intra = 1 - sum(pearson(a, b) for a, b in columns) / 3
    got_inter, got_intra = dist_terms(logits_of(*y_s), logits_of(*y_t), tau=1.0)
    assert got_inter.item() == pytest.approx(inter, abs=1e-6)
    assert got_intra.item() == pytest.approx(intra, abs=1e-6)
    # tau = 4 on logits x 4: the same distributions, times tau^2 = 16.
    got = dist_loss(4 * logits_of(*y_s), 4 * logits_of(*y_t), tau=4.0, beta=1.0, gamma=1.0)
    assert got.item() == pytest.approx(16 * (inter + intra), rel=1e-5)


def test_dist_inter_is_over_samples_and_intra_over_classes():
    # Each teacher row is a positive affine map of the student's row (a_b y + (1 - a_b) / C keeps the sum 1):
    # every per-sample correlation is 1, so inter = 0, while the per-class columns are not correlated exactly.
    y_s = F.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), dim=1).double()
    a = torch.tensor([0.3, 0.9, 0.5, 0.7], dtype=torch.float64)[:, None]
    y_t = a * y_s + (1 - a) / 5
    inter, intra = dist_terms(torch.log(y_s), torch.log(y_t), tau=1.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-6)
    assert intra.item() > 1e-3


def test_dist_of_identical_logits_is_zero():
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # Not exactly 0: the 1e-8 in each correlation's denominator leaves ~ 16 * 2 * 1e-8 / var(y) at tau 4.
    assert dist_loss(z, z).item() == pytest.approx(0.0, abs=1e-3)
    assert dist_loss(z, z, tau=1.0).item() == pytest.approx(0.0, abs=1e-5)


# -- CRD ------------------------------------------------------------------------------------------
def test_nce_loss_matches_the_hand_computation():
    # N = 4 data, K = 2 negatives: K * P_n = 0.5.
    scores = torch.tensor([[0.5, 0.1, 0.3]])
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.6) + math.log(0.5 / 0.8))
    assert nce_loss(scores, num_data=4).item() == pytest.approx(expected, abs=1e-5)


def unit_memory(num_data=6, dim=2):
    memory = ContrastMemory(dim, num_data, temperature=0.5, momentum=0.5)
    angles = torch.arange(num_data, dtype=torch.float32)
    rows = torch.stack([angles.cos(), angles.sin()], dim=1)
    memory.student_bank.copy_(rows)
    memory.teacher_bank.copy_(rows.flip(0))
    return memory


def test_memory_update_uses_the_momentum_and_touches_only_the_batch_rows():
    memory = unit_memory()
    before_s, before_t = memory.student_bank.clone(), memory.teacher_bank.clone()
    v_s, v_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, -1.0], [-1.0, 0.0]])
    indices = torch.tensor([2, 4])
    memory.update(indices, v_s, v_t)
    for bank, before, v in ((memory.student_bank, before_s, v_s), (memory.teacher_bank, before_t, v_t)):
        for row, i in enumerate(indices.tolist()):
            mixed = 0.5 * before[i] + 0.5 * v[row]
            assert torch.allclose(bank[i], mixed / mixed.norm(), atol=1e-6)
        untouched = [i for i in range(6) if i not in indices.tolist()]
        assert torch.equal(bank[untouched], before[untouched])
        assert torch.allclose(bank.norm(dim=1), torch.ones(6), atol=1e-6)


def test_memory_scores_and_z_is_fixed_on_the_first_batch():
    memory = unit_memory()
    v_s, v_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    contrast = torch.tensor([[1, 3, 5]])
    teacher_rows, student_rows = memory.teacher_bank[contrast[0]].clone(), memory.student_bank[contrast[0]].clone()
    p_s, p_t = memory(v_s, v_t, torch.tensor([1]), contrast)
    raw_s = torch.exp(teacher_rows @ v_s[0] / 0.5)  # student embedding vs teacher bank
    raw_t = torch.exp(student_rows @ v_t[0] / 0.5)  # teacher embedding vs student bank
    z_s, z_t = raw_s.mean() * 6, raw_t.mean() * 6
    assert memory.z_student.item() == pytest.approx(z_s.item(), rel=1e-6)
    assert memory.z_teacher.item() == pytest.approx(z_t.item(), rel=1e-6)
    assert torch.allclose(p_s[0], raw_s / z_s, rtol=1e-6) and torch.allclose(p_t[0], raw_t / z_t, rtol=1e-6)
    memory(torch.tensor([[0.6, 0.8]]), v_t, torch.tensor([2]), contrast)
    assert memory.z_student.item() == pytest.approx(z_s.item(), rel=1e-6)  # unchanged after the first batch


def test_contrast_indices_are_the_sample_then_k_other_class_negatives():
    train_labels = torch.arange(40) % 4  # 10 images per class, 30 of other classes per anchor
    indices = torch.tensor([0, 5, 10, 39])
    labels = train_labels[indices]
    contrast = sample_contrast_indices(indices, labels, train_labels, num_negatives=25)
    assert contrast.shape == (4, 26)
    assert torch.equal(contrast[:, 0], indices)
    negatives = contrast[:, 1:]
    assert (train_labels[negatives] != labels[:, None]).all()
    assert all(len(set(row.tolist())) == 25 for row in negatives)  # without replacement: 25 <= 30
    many = sample_contrast_indices(indices, labels, train_labels, num_negatives=35)  # 35 > 30: with replacement
    assert many.shape == (4, 36) and (train_labels[many[:, 1:]] != labels[:, None]).all()


def test_crd_method_returns_the_configured_number_of_negatives(pair, batch):
    teacher, student = pair
    method = methods.build("crd", student, teacher, input_shape=(1, 28, 28), num_negatives=16)
    with pytest.raises(MissingInputError, match="bind_train_set"):
        method(*batch)
    train_labels = torch.arange(60) % 10
    method.bind_train_set(train_labels)
    assert method.memory.student_bank.shape == (60, 128) and method.memory.teacher_bank.shape == (60, 128)
    images, _ = batch
    indices = torch.tensor([3, 17, 25, 48])
    seen = {}
    method.memory.register_forward_hook(lambda m, args, out: seen.update(shape=out[0].shape))
    _, terms = method(images, train_labels[indices], indices)
    assert seen["shape"] == (4, 17)
    assert set(terms) == {"ce", "crd"} and torch.isfinite(terms["crd"])
    terms["crd"].backward()
    assert method.embed_student.linear.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_crd_refuses_more_negatives_than_training_images(pair):
    teacher, student = pair
    method = methods.build("crd", student, teacher, input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="num_negatives=16384"):
        method.bind_train_set(torch.arange(10_000) % 10)


def test_loader_with_indices_yields_the_dataset_positions():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    data = ImageDataset(images, torch.arange(20) % 3, 3, (0.0,), (1 / 255,))
    loader = DeviceLoader(data, 6, shuffle=True, seed=3, with_indices=True)
    seen = []
    for x, y, idx in loader:
        assert torch.equal(y, data.labels[idx]) and torch.equal(x[:, 0, 0, 0], idx.float())
        seen += idx.tolist()
    assert sorted(seen) == list(range(20))
    plain = next(iter(DeviceLoader(data, 6)))
    assert len(plain) == 2 == len(tuple(plain)) and plain.indices is None  # unpacks as (x, y) without positions


# -- ReviewKD -------------------------------------------------------------------------------------
def checkerboard(size):
    r = torch.arange(size)
    return ((r[:, None] + r[None, :]) % 2 * 2 - 1).float().view(1, 1, size, size)


def test_hcl_level_weights():
    # A +-1 checkerboard vs 0: MSE 1 at full size, 0 after any pooling to an even size or 1x1.
    assert hcl_level(checkerboard(8), torch.zeros(1, 1, 8, 8)).item() == pytest.approx(1 / 1.875)
    assert hcl_level(checkerboard(4), torch.zeros(1, 1, 4, 4)).item() == pytest.approx(1 / 1.75)
    # checkerboard + 1 (values 0 and 2): MSE 2 at full size, 1 at every pooled size.
    offset = checkerboard(8) + 1
    assert hcl_level(offset, torch.zeros(1, 1, 8, 8)).item() == pytest.approx((2 + 0.5 + 0.25 + 0.125) / 1.875)
    assert hcl_level(torch.full((1, 3, 1, 1), 2.0), torch.zeros(1, 3, 1, 1)).item() == pytest.approx(4.0)


def cifar_pairs(method):
    return sorted((CONFIGS / "cifar100" / method).glob("*.yaml"))


@pytest.mark.parametrize("path", cifar_pairs("reviewkd"), ids=lambda p: p.stem)
def test_reviewkd_predictions_match_the_teacher_levels_on_the_cifar_pairs(path):
    cfg = load_config(path)
    torch.manual_seed(0)
    teacher = models.build(cfg.teacher.name, num_classes=100)
    student = models.build(cfg.student.name, num_classes=100)
    method = methods.build("reviewkd", student, teacher, **cfg.method.options).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        student(images)
        teacher(images)
        predictions = method.review(method.student_tap.take())
    targets = method.teacher_tap.take()
    assert len(predictions) == len(roles(student).stages) + 1
    assert [p.shape[1:] for p in predictions] == [
        t.shape[1:] if t.dim() == 4 else (t.shape[1], 1, 1) for t in targets]
    gates = [abf.gate is not None for abf in method.abfs]
    assert gates == [True] * (len(gates) - 1) + [False]  # the pooled (deepest) level has no gate


@pytest.mark.parametrize("bias", [True, False])
def test_gated_sum_equals_the_sigmoid_gate_on_the_concatenation(bias):
    torch.manual_seed(0)
    gate = nn.Conv2d(10, 2, 1, bias=bias)
    x = torch.randn(3, 5, 4, 6, requires_grad=True)
    other = torch.randn(3, 5, 4, 6, requires_grad=True)
    g = torch.sigmoid(gate(torch.cat([x, other], dim=1)))
    expected = x * g[:, :1] + other * g[:, 1:]
    got = gated_sum(gate, x, other)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [x, other, gate.weight])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, other, gate.weight])
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_reviewkd_channels_for_resnet32x4_to_resnet8x4_follow_mdistiller():
    torch.manual_seed(0)
    method = methods.build("reviewkd", models.build("resnet8x4"), models.build("resnet32x4"))
    assert [a.reduce[0].in_channels for a in method.abfs] == [64, 128, 256, 256]
    assert [a.predict[0].out_channels for a in method.abfs] == [64, 128, 256, 256]
    assert {a.reduce[0].out_channels for a in method.abfs} == {256}  # M = min(512, 256)
    assert method.out_sizes == [(32, 32), (16, 16), (8, 8), (1, 1)]
    assert method.teacher_tap.names[0] == "stages.0.4.relu:input"  # teacher targets are pre-ReLU


# -- SP, PKT, RKD, VID ----------------------------------------------------------------------------
def test_sp_matches_the_hand_computation():
    # Student rows [1, 0], [1, 1]: Gram [[1, 1], [1, 2]] -> rows [1, 1] / sqrt 2 and [1, 2] / sqrt 5.
    # Teacher rows [1, 0], [0, 1]: Gram I. Loss: squared Frobenius distance / B^2.
    f_s, f_t = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r2, r5 = 1 / math.sqrt(2), 1 / math.sqrt(5)
    expected = ((1 - r2) ** 2 + r2**2 + r5**2 + (1 - 2 * r5) ** 2) / 4
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, abs=1e-6)


def test_pkt_matches_the_hand_computation():
    # Student [1, 0], [0, 1]: cosines I -> (c + 1) / 2 = [[1, .5], [.5, 1]] -> rows [2/3, 1/3], [1/3, 2/3].
    # Teacher [1, 0], [2, 0]: cosines all 1 -> rows [.5, .5]. Mean of Q log(Q / P) over the 4 entries.
    f_s, f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    expected = 2 * (0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))) / 4
    assert pkt_loss(f_s, f_t).item() == pytest.approx(expected, abs=1e-5)


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_by_hand(s, t):
    def distances(p):
        d = [[math.dist(a, b) for b in p] for a in p]
        mean = sum(x for row in d for x in row if x > 0) / sum(1 for row in d for x in row if x > 0)
        return [x / mean for row in d for x in row]

    def angles(p):
        out = []
        for j in range(len(p)):
            for i in range(len(p)):
                for k in range(len(p)):
                    u = [a - b for a, b in zip(p[i], p[j], strict=True)]
                    v = [a - b for a, b in zip(p[k], p[j], strict=True)]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(0.0 if nu == 0 or nv == 0 else (u[0] * v[0] + u[1] * v[1]) / (nu * nv))
        return out

    dist = [smooth_l1(a, b) for a, b in zip(distances(s), distances(t), strict=True)]
    angle = [smooth_l1(a, b) for a, b in zip(angles(s), angles(t), strict=True)]
    return sum(dist) / len(dist), sum(angle) / len(angle)


def test_rkd_matches_the_hand_computation_and_ignores_similarity_transforms():
    s = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    t = [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0)]
    distance, angle = rkd_terms(torch.tensor(s), torch.tensor(t))
    exp_distance, exp_angle = rkd_by_hand(s, t)
    assert distance.item() == pytest.approx(exp_distance, abs=1e-5) and distance.item() > 0
    assert angle.item() == pytest.approx(exp_angle, abs=1e-5) and angle.item() > 0
    scaled = torch.tensor(s) * 3 + torch.tensor([5.0, -1.0])  # scale and shift: same relations
    distance, angle = rkd_terms(torch.tensor(s), scaled)
    assert distance.item() == pytest.approx(0.0, abs=1e-6) and angle.item() == pytest.approx(0.0, abs=1e-6)


def test_vid_matches_the_hand_computation():
    regressor = VIDRegressor(3, 4, 4, init_variance=5.0)
    assert torch.allclose(regressor.variance(), torch.full((4,), 5.0), atol=1e-5)
    torch.nn.init.zeros_(regressor.mean[-1].weight)  # predicted mean 0
    loss = regressor(torch.randn(2, 3, 4, 4), torch.ones(2, 4, 4, 4))
    assert loss.item() == pytest.approx(0.5 * (1 / 5 + math.log(5)), rel=1e-5)


# -- every method: a training step and tiny digits runs -------------------------------------------
@pytest.fixture
def pair():
    torch.manual_seed(0)
    return models.build("resnet20", num_classes=10, in_channels=1), models.build("resnet8", num_classes=10,
                                                                                  in_channels=1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)


@pytest.mark.parametrize("name", [m for m in BASELINES if m != "crd"])
def test_gradients_reach_the_student_and_side_modules_not_the_teacher(name, pair, batch):
    teacher, student = pair
    method = methods.build(name, student, teacher, input_shape=(1, 28, 28))
    method.set_progress(30, 240)
    logits, terms = method(*batch)
    assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is not None for m in method.side_modules().values() for p in m.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# 320 training images, three cosine epochs in batches of 32: enough for every baseline to beat chance on digits
RUN = ("data.val_size=200", "data.train_subset=320", "train.epochs=3", "train.batch_size=32",
       "train.schedule.name=cosine")
# 8x8 digits: the 1000 AT weight, set for 32x32 maps, swamps CE on attention maps of 4 to 64 pixels.
DIGITS_OPTIONS = {"dkd": ["method.options.warmup=0"], "reviewkd": ["method.options.warmup=0"],
                  "crd": ["method.options.num_negatives=128"], "at": ["method.options.at_weight=10"]}


def digits_config(tmp_path, teacher_dir, name, *extra, run="run"):
    return tiny_run(tmp_path, run, *RUN, f"method.name={name}", *teacher_changes(teacher_dir),
                    *DIGITS_OPTIONS.get(name, []), *extra)


@pytest.mark.parametrize("name", BASELINES)
def test_tiny_digits_run_trains(name, tmp_path, digits_teacher):
    cfg = digits_config(tmp_path, digits_teacher, name)
    summary = train_run(cfg)
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in lines)
    assert lines[-1]["loss_ce"] < lines[0]["loss_ce"]
    if name != "crd":  # CRD's NCE term first rises: Z is fixed on the random banks, then embeddings cluster
        assert lines[-1]["loss"] < lines[0]["loss"]
    assert summary["test_acc"] > 20.0  # chance is 10%


def test_crd_run_resumes_exactly(tmp_path, digits_teacher):
    class Interrupt(Exception):
        pass

    def stop(epoch, record):
        if epoch == 1:
            raise Interrupt

    extra = ["train.epochs=2", "method.options.kd_weight=1.0"]  # CRD+KD
    full = digits_config(tmp_path, digits_teacher, "crd", *extra, run="full")
    train_run(full)
    cut = digits_config(tmp_path, digits_teacher, "crd", *extra, run="cut")
    with pytest.raises(Interrupt):
        train_run(cut, on_epoch_end=stop)
    train_run(load_run_config(cut.run_dir), resume=True)
    a = load_checkpoint(full.run_dir / CHECKPOINT_FILE)["method"]
    b = load_checkpoint(cut.run_dir / CHECKPOINT_FILE)["method"]
    assert "memory.student_bank" in a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    shipped = load_file(str(full.run_dir / "student.safetensors"))
    assert not any(k.startswith(("memory", "embed")) for k in shipped)
