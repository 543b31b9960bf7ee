"""Published CIFAR checkpoints (RepDistiller, mdistiller layouts) of every zoo family load as they are: written
here in those layouts by key lists made from the peers' module definitions, and read back through our own rules."""

import argparse

import pytest
import torch

from distillab import models
from distillab.cli import main
from distillab.config_files import load_config
from distillab.data import load_splits
from distillab.engine.checkpoint import load_weights, read_state_dict
from distillab.errors import CheckpointError
from distillab.run import build_models
from test_reparam import randomize_bn

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(prefix):
    return [f"{prefix}.{name}" for name in BN]


def cifar_resnet_keys(model, linear="fc", shortcut="downsample"):
    """models/resnet.py (and resnetv2.py with linear="linear", shortcut="shortcut"), in registration order."""
    keys = ["conv1.weight", *bn("bn1")]
    for stage_index, stage in enumerate(model.stages, 1):
        for i, block in enumerate(stage):
            p = f"layer{stage_index}.{i}"
            for j in (1, 2, 3) if hasattr(block, "conv3") else (1, 2):
                keys += [f"{p}.conv{j}.weight", *bn(f"{p}.bn{j}")]
            if any(name.startswith("shortcut") for name, _ in block.named_parameters()):
                keys += [f"{p}.{shortcut}.0.weight", *bn(f"{p}.{shortcut}.1")]
    return [*keys, f"{linear}.weight", f"{linear}.bias"]


def wrn_keys(model):
    """models/wrn.py: conv1, block<b>.layer.<i>.(bn1 conv1 bn2 conv2 [convShortcut]), bn1, fc."""
    keys = ["conv1.weight"]
    for b, stage in enumerate(model.stages, 1):
        for i, block in enumerate(stage):
            p = f"block{b}.layer.{i}"
            keys += [*bn(f"{p}.bn1"), f"{p}.conv1.weight", *bn(f"{p}.bn2"), f"{p}.conv2.weight"]
            if any(name.startswith("shortcut") for name, _ in block.named_parameters()):
                keys.append(f"{p}.convShortcut.weight")
    return [*keys, *bn("bn1"), "fc.weight", "fc.bias"]


def vgg_keys(model):
    """models/vgg.py with batch_norm: block<b> = (conv, BN, ReLU) per layer, then classifier."""
    keys = []
    for b, part in enumerate([model.stem, *model.stages]):
        for layer in range(len(part)):
            keys += [f"block{b}.{3 * layer}.weight", f"block{b}.{3 * layer}.bias", *bn(f"block{b}.{3 * layer + 1}")]
    return [*keys, "classifier.weight", "classifier.bias"]


def shufflenet_v1_keys(model):
    """models/ShuffleNetv1.py: conv1, bn1, layer<l>.<i>.(conv1 bn1 conv2 bn2 conv3 bn3), linear."""
    keys = ["conv1.weight", *bn("bn1")]
    for stage_index, stage in enumerate(model.stages, 1):
        for i in range(len(stage)):
            for j in (1, 2, 3):
                keys += [f"layer{stage_index}.{i}.conv{j}.weight", *bn(f"layer{stage_index}.{i}.bn{j}")]
    return [*keys, "linear.weight", "linear.bias"]


def shufflenet_v2_keys(model):
    """models/ShuffleNetv2.py: conv1, bn1, layer<l> (a DownBlock of conv/bn 1-5, then BasicBlocks of 1-3), conv2,
    bn2, linear."""
    keys = ["conv1.weight", *bn("bn1")]
    for stage_index, stage in enumerate(model.stages, 1):
        for i in range(len(stage)):
            for j in (1, 2, 3, 4, 5) if i == 0 else (1, 2, 3):
                keys += [f"layer{stage_index}.{i}.conv{j}.weight", *bn(f"layer{stage_index}.{i}.bn{j}")]
    return [*keys, "conv2.weight", *bn("bn2"), "linear.weight", "linear.bias"]


def mobilenet_v2_keys(model):
    """models/mobilenetv2.py: conv1 (conv, BN), blocks.<b>.<i>.conv.(0 1 3 4 6 7) for its 7 block settings of
    1, 2, 3, 4, 3, 3, 1 blocks, conv2 (conv, BN), classifier.0."""
    keys = ["conv1.0.weight", *bn("conv1.1")]
    for b, n in enumerate((1, 2, 3, 4, 3, 3, 1)):
        for i in range(n):
            for conv, norm in (("0", "1"), ("3", "4"), ("6", "7")):
                keys += [f"blocks.{b}.{i}.conv.{conv}.weight", *bn(f"blocks.{b}.{i}.conv.{norm}")]
    return [*keys, "conv2.0.weight", *bn("conv2.1"), "classifier.0.weight", "classifier.0.bias"]


LAYOUTS = {
    "ShuffleV1": shufflenet_v1_keys,
    "ShuffleV2": shufflenet_v2_keys,
    "mobile_half": mobilenet_v2_keys,
    **{name: cifar_resnet_keys for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                                            "resnet110", "resnet8x4", "resnet32x4")},
    **{name: wrn_keys for name in ("wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_28_2", "wrn_28_4", "wrn_40_1",
                                   "wrn_40_2")},
    **{name: vgg_keys for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    **{name: (lambda m: cifar_resnet_keys(m, "linear", "shortcut")) for name in ("ResNet18", "ResNet34", "ResNet50")},
}


def peer_checkpoint(name, path, kind="epoch", seed=0):
    """A zoo model with random weights and BN statistics, saved in the peers' layout; returns its logits on x."""
    torch.manual_seed(seed)
    model = models.build(name, num_classes=100)
    randomize_bn(model, seed=seed)
    keys = LAYOUTS[name](model)
    values = list(model.state_dict().values())
    assert len(keys) == len(values), (name, len(keys), len(values))
    state = dict(zip(keys, values, strict=True))
    if kind == "epoch":  # ckpt_epoch_240.pth: {'epoch', 'model', 'accuracy', 'optimizer'}
        torch.save({"epoch": 240, "model": state, "accuracy": 77.0, "optimizer": None}, path)
    elif kind == "last":  # RepDistiller's *_last.pth: also the argparse options
        torch.save({"opt": argparse.Namespace(model=name, lr=0.05), "model": state, "epoch": 240}, path)
    elif kind == "net":
        torch.save({"net": state}, path)
    else:  # a bare state dict, saved from nn.DataParallel
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x), x


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_published_teacher_family_loads_with_the_same_logits(name, tmp_path):
    expected, x = peer_checkpoint(name, tmp_path / "ckpt_epoch_240.pth")
    fresh = models.build(name, num_classes=100)
    load_weights(fresh, tmp_path / "ckpt_epoch_240.pth", "teacher")
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["last", "net", "dataparallel"])
def test_the_other_checkpoint_layouts_load_too(kind, tmp_path):
    expected, x = peer_checkpoint("resnet32x4", tmp_path / "w.pth", kind)
    fresh = models.build("resnet32x4", num_classes=100)
    load_weights(fresh, tmp_path / "w.pth")
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), expected, rtol=1e-5, atol=1e-5)


class Opaque:
    """An object no allow-list admits: weights_only=True must refuse it rather than run its pickle."""


def test_errors_name_the_real_cause_without_terminal_codes(tmp_path):
    peer_checkpoint("resnet56", tmp_path / "r56.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'stem\.conv\.weight': file has \(16, 3, 3, 3\)"):
        load_weights(models.build("resnet32x4", num_classes=100), tmp_path / "r56.pth")  # another network
    state = read_state_dict(tmp_path / "r56.pth")
    state["layer9.0.foo.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"'layer9\.0\.foo\.weight' is in neither distillab's CifarResNet "
                                              r"layout nor RepDistiller/mdistiller's"):
        load_weights(models.build("resnet56", num_classes=100), tmp_path / "odd.pth")

    torch.save({"model": state, "extra": Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="objects other than tensors") as info:
        read_state_dict(tmp_path / "pickled.pth")
    assert "\x1b[" not in str(info.value)


def test_a_repdistiller_teacher_trains_a_kd_student_from_the_cli(tmp_path):
    peer_checkpoint("resnet8x4", tmp_path / "ckpt_epoch_240.pth")
    config = tmp_path / "kd.yaml"
    config.write_text(f"output_dir: {tmp_path / 'runs'}\nname: kd\n"
                      "data: {name: synthetic, synthetic: {num_classes: 100, train_size: 64, test_size: 32}}\n"
                      f"teacher: {{name: resnet8x4, checkpoint: {tmp_path / 'ckpt_epoch_240.pth'}}}\n"
                      "student: {name: resnet8}\nmethod: {name: kd}\n"
                      "train: {epochs: 1, batch_size: 32, progress: false}\n")
    assert main(["train", str(config)]) == 0
    # the same file as the student's starting point: its weights, not the seeded init, begin training
    cfg = load_config(config, ["student.name=resnet8x4", f"student.checkpoint={tmp_path / 'ckpt_epoch_240.pth'}"])
    teacher, student, info = build_models(cfg, load_splits(cfg.data))
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values(),
                                                  strict=True))
    assert info["student_init_sha256"] == info["teacher_sha256"]
    out = tmp_path / "teacher.safetensors"
    assert main(["convert", str(tmp_path / "ckpt_epoch_240.pth"), str(out), "--model", "resnet8x4",
                 "--num-classes", "100"]) == 0
    fresh = models.build("resnet8x4", num_classes=100)
    load_weights(fresh, out)  # our own layout now
    assert set(read_state_dict(out)) == set(fresh.state_dict())
