"""SimKD: the loss and logits on fixed tensors against hand computations, the frozen reused teacher classifier, and
its deployed network (student, projector, teacher classifier) as trained, evaluated, exported and rebuilt."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import teacher_changes, tiny_config
from distillab import methods, models
from distillab.cli import main
from distillab.config_files import load_config
from distillab.engine.evaluate import eval_loader, evaluate
from distillab.errors import CheckpointError, ConfigError
from distillab.export import CARD_VERSION, export_model, load_exported, read_card
from distillab.methods.simkd import SimKD, SimKDNetwork
from distillab.run import restore_method

CIFAR_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "cifar100" / "simkd").glob("*.yaml"))
CARD = {"version": CARD_VERSION, "model": "resnet8", "kwargs": {}, "num_classes": 10, "input_size": [3, 32, 32],
        "mean": [0.5] * 3, "std": [0.25] * 3, "method": "simkd", "fused_bn": False}


class Toy(nn.Module):
    """A classifier whose tapped map is `body(images)`: fixed tensors in, known features out."""

    def __init__(self, body: nn.Module, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


def toy_simkd(student_body: nn.Module, teacher_body: nn.Module, size: int, **options) -> SimKD:
    """SimKD between two toys on 2 x size x size inputs, its projector made the identity on non-negative maps."""
    torch.manual_seed(0)
    method = methods.build("simkd", Toy(student_body), Toy(teacher_body), input_shape=(2, size, size), factor=1,
                           student_layer="body", teacher_layer="body", teacher_classifier="fc", **options)
    with torch.no_grad():
        for m in method.projector:
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                k = m.kernel_size[0] // 2
                for i in range(m.out_channels):
                    m.weight[i, i, k, k] = 1.0
            elif isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0  # eval mode, mean 0, var 1, affine 1/0: the identity
    return method.eval()


def test_the_loss_is_the_weighted_mse_to_the_teacher_map_by_hand():
    # f_s = x, f_t = 2x, P = identity: MSE = mean(x^2) = (0^2 + ... + 15^2) / 16 = 1240 / 16 = 77.5
    method = toy_simkd(nn.Identity(), Scale(2.0), 2, feature_weight=2.0)
    x = torch.arange(16.0).view(2, 2, 2, 2)
    logits, terms = method(x, torch.tensor([0, 1]))
    assert set(terms) == {"feature"}  # no CE by default (official code: -c 0 -d 0 -b 1)
    assert terms["feature"].item() == pytest.approx(2.0 * 77.5)
    # the logits: the teacher's classifier on the pooled projected (here: unchanged) student map
    torch.testing.assert_close(logits, method.teacher.fc(x.mean((2, 3))))


def test_ce_weighs_cross_entropy_on_the_reused_classifier_logits():
    method = toy_simkd(nn.Identity(), Scale(2.0), 2, ce_weight=0.5)
    x, y = torch.arange(16.0).view(2, 2, 2, 2), torch.tensor([2, 0])
    _, terms = method(x, y)
    assert set(terms) == {"feature", "ce"}
    torch.testing.assert_close(terms["ce"], 0.5 * F.cross_entropy(method.teacher.fc(x.mean((2, 3))), y))


@pytest.mark.parametrize("student_larger", [True, False])
def test_the_larger_map_is_average_pooled_to_the_smaller(student_larger):
    # one network sees the 4x4 input, the other its 2x2 average pool (the teacher's doubled): P = identity, so the
    # loss is mean(p^2), p the 2x2 pool, whichever side was pooled; the student's map is pooled before P
    pool = nn.AvgPool2d(2)
    student, teacher = (nn.Identity(), nn.Sequential(pool, Scale(2.0))) if student_larger else (pool, Scale(2.0))
    method = toy_simkd(student, teacher, 4)
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    _, terms = method(x, torch.tensor([0, 1, 2]))
    p = F.avg_pool2d(x, 2)
    torch.testing.assert_close(terms["feature"], p.square().mean())
    assert method.deploy_card()["pool_to"] == ([2, 2] if student_larger else None)


@pytest.fixture
def pair():
    torch.manual_seed(0)
    return models.build("resnet8", num_classes=10, in_channels=3), models.build("resnet8", num_classes=10,
                                                                               in_channels=3)


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_the_logits_are_exactly_the_teacher_classifier_on_the_projected_map(pair):
    teacher, student = pair
    method = methods.build("simkd", student, teacher, input_shape=(3, 32, 32)).eval()
    x, y = batch()
    logits, terms = method(x, y)
    with torch.no_grad():
        f_s = student.head.pre(student.stages[2](student.stages[1](student.stages[0](student.stem(x)))))
        f_t = teacher.head.pre(teacher.stages[2](teacher.stages[1](teacher.stages[0](teacher.stem(x)))))
        projected = method.projector(f_s)
        expected = teacher.head.fc(F.adaptive_avg_pool2d(projected, 1).flatten(1))
    assert torch.equal(logits, expected)
    torch.testing.assert_close(terms["feature"], F.mse_loss(projected, f_t))
    convs = [m for m in method.projector if isinstance(m, nn.Conv2d)]  # 64 -> 32 -> 32 (3x3, not grouped) -> 64
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in convs] == [
        (64, 32, (1, 1), 1), (32, 32, (3, 3), 1), (32, 64, (1, 1), 1)]


def test_the_teacher_classifier_is_frozen_and_the_student_trains(pair):
    teacher, student = pair
    method = methods.build("simkd", student, teacher, input_shape=(3, 32, 32), ce_weight=1.0).train()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    params = [p for p in method.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in method.classifier.parameters())
    assert not any(p.requires_grad for p in student.head.fc.parameters())  # the student's own: no term reaches it
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    _, terms = method(*batch())
    sum(terms.values()).backward()
    optimizer.step()
    after = method.state_dict()
    for key in ("classifier.weight", "classifier.bias", "student.head.fc.weight"):
        assert torch.equal(after[key], before[key]), key
    assert torch.equal(after["classifier.weight"], teacher.head.fc.weight)
    for key in ("projector.0.weight", "student.stem.conv.weight"):
        assert not torch.equal(after[key], before[key]), key
    assert all(p.grad is None for p in teacher.parameters())


def test_the_deployed_network_gives_the_training_forward_logits_and_is_what_deploy_ships(pair):
    teacher, student = pair
    method = methods.build("simkd", student, teacher, input_shape=(3, 32, 32))
    network = method.deployed_network
    assert isinstance(network, SimKDNetwork) and method.deploy() is network
    assert network.student is student and network.projector is method.projector
    assert network.training and not method.eval().deployed_network.training  # its mode follows the method's
    x, y = batch()
    with torch.no_grad():
        logits, _ = method(x, y)
        assert torch.equal(network(x), logits)
    assert not any(k.startswith("teacher.") for k in network.state_dict())
    assert {k.split(".")[0] for k in network.state_dict()} == {"student", "projector", "classifier"}
    assert method.side_parameter_count() == sum(p.numel() for p in method.projector.parameters())


def test_rebuild_deployed_from_the_card_and_state_dict_gives_identical_logits(pair, tmp_path):
    teacher, student = pair
    method = methods.build("simkd", student, teacher, input_shape=(3, 32, 32)).train()
    method(*batch(8))  # BN statistics away from their start
    network = method.eval().deploy()
    method.close()
    card = json.loads(json.dumps(method.deploy_card()))  # JSON data, as a model card holds it
    rebuilt = SimKD.rebuild_deployed(models.build("resnet8", num_classes=10, in_channels=3), card)
    rebuilt.load_state_dict(network.state_dict())  # strict
    x = batch()[0]
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), network(x))
    export_model(network, tmp_path / "simkd.safetensors", {**CARD, "deploy": card})
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "simkd.safetensors")(x), network(x))
    with pytest.raises(CheckpointError, match="simkd model card"):
        SimKD.rebuild_deployed(models.build("resnet8", num_classes=10, in_channels=3), {"channels": [64]})


def test_onnx_and_torch_export_of_the_deployed_network_match_deploy(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    teacher = models.build("vgg8", num_classes=10, in_channels=3)  # 512 x 4 x 4: the student's 8 x 8 is pooled
    method = methods.build("simkd", models.build("resnet8", num_classes=10, in_channels=3), teacher,
                           input_shape=(3, 32, 32))
    assert method.deploy_card()["pool_to"] == [4, 4]
    network = method.eval().deploy()
    method.close()
    card = {**CARD, "deploy": method.deploy_card()}
    export_model(network, tmp_path / "simkd.onnx", card, "onnx")
    export_model(network, tmp_path / "simkd.pt2", card, "torch-export")
    assert read_card(tmp_path / "simkd.onnx")["deploy"] == card["deploy"]
    session = ort.InferenceSession(str(tmp_path / "simkd.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(tmp_path / "simkd.pt2").module()
    for n in (1, 3):
        x = batch(n)[0]
        with torch.no_grad():
            expected = network(x)
            assert np.abs(session.run(["logits"], {"images": x.numpy()})[0] - expected.numpy()).max() < 1e-5
            torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)


def test_a_teacher_without_a_classifier_or_matching_channels_is_refused(pair):
    teacher, student = pair
    with pytest.raises(ConfigError, match=r"teacher has no module 'head\.fcc'"):
        methods.build("simkd", student, teacher, input_shape=(3, 32, 32), teacher_classifier="head.fcc")
    with pytest.raises(ConfigError, match="its classifier takes 64"):
        methods.build("simkd", student, teacher, input_shape=(3, 32, 32), teacher_layer="stages.1")


@pytest.mark.slow  # builds every pair's networks (30 s)
def test_the_cifar100_configs_follow_the_official_recipe_and_build_on_every_pair():
    assert len(CIFAR_CONFIGS) == 9
    for path in CIFAR_CONFIGS:
        cfg = load_config(path)
        assert cfg.train.epochs == 240 and cfg.train.batch_size == 64 and cfg.train.optim.weight_decay == 5e-4
        assert cfg.train.optim.lr == (0.01 if cfg.student.name in ("mobile_half", "ShuffleV1", "ShuffleV2") else 0.05)
        teacher = models.build(cfg.teacher.name, num_classes=100)
        method = methods.build("simkd", models.build(cfg.student.name, num_classes=100), teacher,
                               **cfg.method.options)
        assert (method.opts.feature_weight, method.opts.ce_weight, method.opts.factor) == (1.0, 0.0, 2)
        assert method.classifier.in_features == teacher.head.fc.in_features == method.deploy_card()["channels"][2]


@pytest.mark.slow
def test_a_run_reports_and_eval_prints_the_deployed_network_accuracy(tmp_path, untrained_digits_teacher, capsys):
    config = tiny_config(tmp_path, "simkd", "method.name=simkd", *teacher_changes(untrained_digits_teacher, "resnet8"))
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "simkd"
    with open(run / "metrics.csv") as f:
        record = list(csv.DictReader(f))[-1]
    cfg, data, method, _ = restore_method(run)
    loader = eval_loader(data.test, "cpu", cfg.train.eval_batch_size)
    deployed, bare = evaluate(method.deployed_network, loader), evaluate(method.student, loader)
    assert float(record["test_acc"]) == pytest.approx(deployed["acc"])
    assert float(record["test_loss"]) == pytest.approx(deployed["loss"])
    assert bare["loss"] != pytest.approx(deployed["loss"])  # the bare student (its own classifier) is not it
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{deployed['acc']:.2f}" in out and f"{deployed['loss']:.4f}" in out
