"""DFA's `distance: overhaul` (Heo et al. 2019): the margin, margin-ReLU, partial L2 and stage weights against hand
computations, the pre-ReLU roles it reads, and the stage-2 distance end to end on fixed tensors."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distillab import methods, models
from distillab.bench.suite import load_suite
from distillab.config_files import load_config
from distillab.errors import ConfigError
from distillab.features import FeatureTap
from distillab.methods.dfa_overhaul import bn_margin, gaussian_margin, margin_relu, partial_l2, stage_weights
from distillab.roles import FeatureInfo, StageInfo, roles

SHAPE = (1, 16, 16)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ hand computations
def integrated_margin(mean: float, std: float, points: int = 200_001) -> float:
    """E[x | x < 0] for x ~ N(mean, std^2) by the trapezoid rule over the density (-3 |std| where P(x < 0) <=
    1e-3, Overhaul's cut-off): an independent check of the closed form."""
    std = abs(std)
    x = torch.linspace(min(mean, 0.0) - 40 * std, 0.0, points, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    p_negative = torch.trapezoid(density, x).item()
    if p_negative <= 1e-3:
        return -3 * std
    return torch.trapezoid(x * density, x).item() / p_negative


def looped_partial_l2(s: torch.Tensor, t: torch.Tensor) -> float:
    """Overhaul's first published form of the loss, value by value: (s - t)^2 unless s <= t <= 0."""
    total = 0.0
    for a, b in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True):
        if b > 0 or a > b:
            total += (a - b) ** 2
    return total


def case_form(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Overhaul's first published distillation_loss (margins per channel, t the raw pre-ReLU teacher): three cases
    written out, with no margin-ReLU of t (a formulation independent of ours)."""
    m = m.view(1, -1, 1, 1)
    return ((s - m).pow(2) * ((s > m) & (t <= m)) + (s - t).pow(2) * ((s > t) & (t > m) & (t <= 0))
            + (s - t).pow(2) * (t > 0)).sum()


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (-1.5, 0.5), (1.0, 2.0), (2.5, -0.8), (-0.2, 3.0),
                                           (3.0, 1.0)])
def test_margin_is_the_mean_of_a_gaussians_negative_part(mean, std):
    ours = gaussian_margin(torch.tensor([mean]), torch.tensor([std])).item()
    assert ours == pytest.approx(integrated_margin(mean, std), rel=1e-5)
    assert ours < min(mean, 0.0)  # below the mean and below 0


def test_margin_is_minus_three_sigma_where_the_map_is_rarely_negative():
    margins = gaussian_margin(torch.tensor([4.0, 3.2, 3.0]), torch.tensor([1.0, -1.0, 1.0])).tolist()
    assert margins[:2] == [-3.0, -3.0]  # P(x < 0) = 3e-5 and 6.9e-4
    assert margins[2] == pytest.approx(integrated_margin(3.0, 1.0), rel=1e-5) and margins[2] > -3.0  # 1.3e-3
    assert gaussian_margin(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(-math.sqrt(2 / math.pi))


def test_bn_margin_reads_the_affine_parameters_not_the_running_statistics():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -0.5, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, -1.0, 5.0]))
        bn.running_mean.copy_(torch.tensor([3.0, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.1, 9.0]))
    expected = [integrated_margin(b, w) for w, b in ((2.0, 0.5), (-0.5, -1.0), (1.0, 5.0))]
    assert bn_margin(bn, "bn").tolist() == pytest.approx(expected, rel=1e-5)
    assert bn_margin(bn, "bn")[2].item() == -3.0
    with pytest.raises(ConfigError, match="use distance mse"):
        bn_margin(nn.BatchNorm2d(3, affine=False), "bn")


def test_margin_relu_is_a_per_channel_max():
    x = torch.tensor([[[[-2.0, -0.1]], [[0.3, -5.0]]]])  # 1 x 2 x 1 x 2
    out = margin_relu(x, torch.tensor([-0.5, -1.0]))
    assert torch.equal(out, torch.tensor([[[[-0.5, -0.1]], [[0.3, -1.0]]]]))


def test_partial_l2_by_explicit_loops():
    s = torch.tensor([-1.0, -0.5, 0.2, -0.3, 1.0, -2.0, 0.0, -0.4])
    t = torch.tensor([-0.5, -0.5, -0.5, 0.4, 0.5, 0.0, 0.0, -0.4])
    # each value: s < t <= 0 -> 0; s = t -> 0; s > t, t < 0 -> 0.49; t > 0 -> 0.49 and 0.25; s < t = 0 -> 0; 0; 0
    assert partial_l2(s, t).item() == pytest.approx(0.49 + 0.49 + 0.25)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t[0, 0] = s[0, 0]  # ties too
    assert partial_l2(s, t).item() == pytest.approx(looped_partial_l2(s, t), rel=1e-6)
    assert partial_l2(s, t).item() < (s - t).pow(2).sum().item()  # some values are ignored


def test_stage_weights_halve_towards_the_input():
    assert stage_weights(3) == [0.25, 0.5, 1.0]
    assert stage_weights(4) == [0.125, 0.25, 0.5, 1.0]
    assert stage_weights(1) == [1.0]


# ------------------------------------------------------------------------------------------ the pre-ReLU roles
@pytest.mark.parametrize("name", ["resnet14", "resnet56"])
def test_resnet_pre_relu_taps_pass_through_relu_to_the_block_outputs(name):
    model = models.build(name, num_classes=10, in_channels=1).eval()
    info = roles(model)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    blocks = [b for s in info.stages for b in s.blocks]
    preacts = [p for s in info.stages for p in s.block_next_preacts]
    bns = [bn for s in info.stages for bn in s.block_next_preact_bns]
    assert preacts == [f"{b}.relu:input" for b in blocks] and bns == [f"{b}.bn2" for b in blocks]
    shortcuts = [f"{b}.shortcut" for b in blocks]
    with torch.no_grad(), FeatureTap(model, [*blocks, *preacts, *bns, *shortcuts]) as tap:
        model(x)
        for block, preact, bn, shortcut in zip(blocks, preacts, bns, shortcuts, strict=True):
            assert torch.equal(torch.relu(tap[preact]), tap[block])  # the tapped map, through ReLU: the role output
            assert torch.equal(tap[bn] + tap[shortcut], tap[preact])  # the named BN ends the branch before the sum
    for stage in info.stages:
        assert stage.block_next_preacts[-1] == stage.next_preact == stage.preact


def test_wrn_pre_relu_taps_are_the_next_batchnorm_of_the_block_outputs():
    model = models.build("wrn_16_2", num_classes=10, in_channels=1).eval()
    with torch.no_grad():  # BNs that are not the identity, so a wrong BN shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
                m.running_mean.uniform_(-0.5, 0.5)
    info = roles(model)
    assert [s.block_next_preacts for s in info.stages] == [
        ("stages.0.1.relu1:input", "stages.1.0.relu1:input"), ("stages.1.1.relu1:input", "stages.2.0.relu1:input"),
        ("stages.2.1.relu1:input", "head.pre.relu:input")]
    assert info.stages[2].block_next_preact_bns == ("stages.2.1.bn1", "head.pre.bn")
    blocks = [b for s in info.stages for b in s.blocks]
    preacts = [p for s in info.stages for p in s.block_next_preacts]
    bns = [b for s in info.stages for b in s.block_next_preact_bns]
    with torch.no_grad(), FeatureTap(model, [*blocks, *preacts]) as tap:
        model(torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1)))
        for block, preact, bn in zip(blocks, preacts, bns, strict=True):
            assert torch.allclose(model.get_submodule(bn)(tap[block]), tap[preact], atol=1e-6)
    assert [s.block_next_preacts[-1] for s in info.stages] == [s.next_preact for s in info.stages]


@pytest.mark.parametrize(("name", "declared_bns"), [("resnet8x4", True), ("vgg8", True), ("wrn_16_2", True),
                                                    ("ShuffleV1", False), ("mobile_half", False)])
def test_declared_pre_relu_points_have_the_block_shapes_and_channels(name, declared_bns):
    model = models.build(name, num_classes=10).eval()
    info = roles(model)
    for stage in info.stages:
        assert len(stage.block_next_preacts) == len(stage.block_next_preact_bns) == len(stage.blocks)
        assert stage.block_next_preacts[-1] == stage.next_preact
        assert any(bn is not None for bn in stage.block_next_preact_bns) == declared_bns
    points = [(b, p, bn) for s in info.stages for b, p, bn in zip(s.blocks, s.block_next_preacts,
                                                                   s.block_next_preact_bns, strict=True) if p]
    with torch.no_grad(), FeatureTap(model, [n for b, p, _ in points for n in (b, p)]) as tap:
        model(torch.zeros(1, *model.input_size))
        for block, preact, bn in points:
            assert tap[preact].shape == tap[block].shape
            if bn is not None:
                assert model.get_submodule(bn).num_features == tap[preact].shape[1]


# ------------------------------------------------------------------------------------------ the stage-2 distance
def nets(seed=0):
    """A resnet14 teacher whose BNs hold random affine parameters (varied margins, some -3 sigma) and a resnet8."""
    torch.manual_seed(seed)
    teacher = models.build("resnet14", num_classes=10, in_channels=1)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(0.0, 1.0)
                m.bias.normal_(0.0, 1.5)
    torch.manual_seed(seed + 1)
    return teacher, models.build("resnet8", num_classes=10, in_channels=1)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def overhaul(mode, **options):
    teacher, student = nets()
    return methods.build("dfa", student, teacher, input_shape=SHAPE, mode=mode, fd_weight=1e-3,
                         distance="overhaul", **options).eval()


def by_hand(method, x, weights):
    """fd / fd_weight from the tapped pre-ReLU maps: per stage i, the margins by integration of each candidate's
    BN, the target sum_j w_j max(T_j, m_j), Overhaul's three cases where one candidate has all the weight (else the
    partial L2 by loops), weighted 1/4, 1/2, 1, over the batch."""
    teacher, student = method.teacher, method.student
    blocks = [[f"stages.{i}.{j}" for j in range(2)] for i in range(3)]
    with torch.no_grad(), FeatureTap(teacher, [f"{b}.relu:input" for g in blocks for b in g]) as t_tap, \
            FeatureTap(student, [f"stages.{i}.0.relu:input" for i in range(3)]) as s_tap:
        teacher(x)
        student(x)
        total = 0.0
        for i, group in enumerate(blocks):
            s = method.connectors[i](s_tap[f"stages.{i}.0.relu:input"])
            margins = [torch.tensor([integrated_margin(b, w, 20_001) for w, b in zip(
                teacher.get_submodule(f"{blk}.bn2").weight.tolist(), teacher.get_submodule(f"{blk}.bn2").bias.tolist(),
                strict=True)]) for blk in group]
            maps = [t_tap[f"{blk}.relu:input"] for blk in group]
            if weights[i].count(1.0) == 1:
                j = weights[i].index(1.0)
                loss = case_form(s, maps[j], margins[j]).item()
            else:
                target = sum(w * torch.maximum(t, m.view(1, -1, 1, 1)) for w, t, m in zip(weights[i], maps, margins,
                                                                                          strict=True))
                loss = looped_partial_l2(s, target)
            total += 2.0 ** (i - 2) * loss
    return total / x.shape[0]


@pytest.mark.parametrize("mode", ["last", "average"])
def test_overhaul_distance_by_hand(mode):
    method = overhaul(mode)
    x, y = batch()
    _, terms = method(x, y)
    weights = [[0.0, 1.0]] * 3 if mode == "last" else [[0.5, 0.5]] * 3
    assert terms["fd"].item() / 1e-3 == pytest.approx(by_hand(method, x, weights), rel=1e-4)
    assert terms["fd"].item() > 0


def test_margins_are_saved_buffers_from_each_candidates_batchnorm():
    method = overhaul("average")
    teacher = method.teacher
    for i in range(3):
        for j in range(2):
            bn = teacher.get_submodule(f"stages.{i}.{j}.bn2")
            expected = [integrated_margin(b, w, 20_001) for w, b in zip(bn.weight.tolist(), bn.bias.tolist(),
                                                                       strict=True)]
            assert method.margins[i][j].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    state = method.trainable_state_dict()
    assert {f"margin_{i}" for i in range(3)} <= set(state) and not any("margin" in n for n, _ in
                                                                        method.named_parameters())
    assert not any(k.startswith("margin") for k in methods.build(  # the mse distance has none
        "dfa", *reversed(nets()), input_shape=SHAPE, mode="last", fd_weight=1.0).trainable_state_dict())


def test_the_teacher_is_read_only_where_a_weight_is_not_zero():
    last, average = overhaul("last"), overhaul("average")
    assert last.teacher_tap.names == [f"stages.{i}.1.relu:input" for i in range(3)]
    assert average.teacher_tap.names == [f"stages.{i}.{j}.relu:input" for i in range(3) for j in range(2)]
    assert [m.shape for m in last.margins] == [(1, 16), (1, 32), (1, 64)]
    assert last.student_tap.names == [f"stages.{i}.0.relu:input" for i in range(3)]
    teacher, student = nets()
    mse_last = methods.build("dfa", student, teacher, input_shape=SHAPE, mode="last", fd_weight=1.0)
    assert mse_last.opts.distance == "mse" and mse_last.teacher_tap.names == [f"stages.{i}.1" for i in range(3)]
    assert mse_last.student_tap.names == [f"stages.{i}" for i in range(3)]


def test_overhaul_connectors_are_he_initialised():
    method = overhaul("last")
    for connector, width in zip(method.connectors, (16, 32, 64), strict=True):
        conv, bn = connector
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / width), rel=0.2)
        assert torch.equal(bn.weight, torch.ones(width)) and torch.equal(bn.bias, torch.zeros(width))


def test_wrn_pair_distils_the_next_batchnorm_outputs():
    torch.manual_seed(0)
    teacher = models.build("wrn_16_2", num_classes=10, in_channels=1)
    student = models.build("wrn_16_1", num_classes=10, in_channels=1)
    method = methods.build("dfa", student, teacher, input_shape=SHAPE, mode="last", fd_weight=1e-3,
                           distance="overhaul")
    assert method.teacher_tap.names == ["stages.1.0.relu1:input", "stages.2.0.relu1:input", "head.pre.relu:input"]
    assert method.student_tap.names == ["stages.1.0.relu1:input", "stages.2.0.relu1:input", "head.pre.relu:input"]
    assert torch.equal(method.margins[2][0], bn_margin(teacher.head.pre.bn, "head.pre.bn"))
    _, terms = method(*batch())
    assert torch.isfinite(terms["fd"]) and terms["fd"] > 0


class Outside(nn.Module):
    """Not a zoo model: stage roles without any pre-ReLU point."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, 10)
        stages = (StageInfo("features.1", width, 1, ("features.1",), (None,), None, None),
                  StageInfo("features.3", 2 * width, 2, ("features.3",), (None,), None, None))
        self.feature_info = FeatureInfo(stages, "features", None, "pool", 2 * width, "features.2")

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def test_a_teacher_without_pre_relu_points_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match=r"method\.options\.distance overhaul .*Outside declares no such point for "
                                          r"features\.1, features\.3 .*use distance mse"):
        methods.build("dfa", Outside(4), Outside(8), input_shape=(1, 8, 8), mode="last", fd_weight=1e-3,
                      distance="overhaul")
    plain = methods.build("dfa", Outside(4), Outside(8), input_shape=(1, 8, 8), mode="last", fd_weight=1.0)
    assert plain(torch.randn(2, 1, 8, 8), torch.arange(2))[0].shape == (2, 10)
    with pytest.raises(ConfigError, match=r"method\.options\.distance: .*'mse' or 'overhaul'"):
        load_config(None, ["method.name=dfa", "method.options={fd_weight: 1.0, distance: l1}"],
                    base={"student": {"name": "resnet8"}})


# ------------------------------------------------------------------------------------------ the experiment's suite
def test_resnet56_suite_crosses_the_four_weightings_with_both_distances(monkeypatch):
    monkeypatch.chdir(ROOT)
    suite = load_suite(Path("suites/fashion_mnist_dfa_resnet56.yaml"))
    modes, distances = ("searched", "last", "average", "random"), ("mse", "overhaul")
    labels = {(m, d): f"dfa_{m}" + ("_overhaul" if d == "overhaul" else "") for m, d in itertools.product(modes,
                                                                                                           distances)}
    assert set(suite.runs) == set(labels.values()) and suite.reference == "dfa_last"
    assert set(suite.tune.grids) == set(labels.values()) and suite.tune.seeds == [100, 101]
    for (mode, distance), label in labels.items():
        cfg = load_config(suite.runs[label].config, layers=[suite.budget])
        options = cfg.method.options
        assert (options["mode"], options.get("distance", "mse")) == (mode, distance), label
        assert cfg.teacher.name == "resnet56" and str(cfg.teacher.checkpoint) == "published:fashion_mnist_resnet56"
        assert cfg.student.name == "resnet8" and not cfg.train.cache_teacher
        assert len(suite.tune.grids[label]["method.options.fd_weight"]) == 4
        assert options["fd_weight"] in suite.tune.grids[label]["method.options.fd_weight"]
    assert suite.runs["dfa_searched_overhaul"].baseline == "dfa_last_overhaul"
