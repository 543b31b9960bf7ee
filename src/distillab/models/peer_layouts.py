"""Published CIFAR checkpoints in our zoo's layout: RepDistiller's and mdistiller's model files name the modules of
the same networks differently (`layer1.0.conv1` for our `stages.0.0.conv1`, `fc` for `head.fc`, ...).

One explicit rule list per architecture family, written from those repositories' module names: every key of the
file must match a rule of the model's family, and the result is then checked key by key and shape by shape like
any other weights file (the first key that fails is named). Every CIFAR zoo family is mapped: CIFAR ResNets (resnet8
... resnet110, resnet8x4, resnet32x4), wide ResNets, VGGs with BN, the ImageNet-style ResNet18/34/50, MobileNetV2
(mobile_half), ShuffleNetV1 and ShuffleNetV2.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from distillab.errors import CheckpointError

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def _stage(prefix: str) -> Callable[[re.Match], str]:
    """layer<l>.<i>.<rest> (or block<l>.layer.<i>.) -> stages.<l-1>.<i>.<prefix><rest>."""
    return lambda m: f"stages.{int(m['stage']) - 1}.{m['block']}.{prefix}{m['rest']}"


def _rules(*pairs: tuple[str, Callable[[re.Match], str] | str]) -> list[Rule]:
    return [(re.compile(pattern), (lambda m, r=repl: m.expand(r)) if isinstance(repl, str) else repl)
            for pattern, repl in pairs]


_RESNET_BLOCK = r"^layer(?P<stage>\d)\.(?P<block>\d+)\."


def _resnet_rules(shortcut: str, classifier: str) -> list[Rule]:
    """conv1, bn1, layer<l>.<i> (conv/bn 1-3 and the shortcut's conv and BN), the classifier."""
    return _rules(
        (r"^conv1\.(?P<rest>.+)$", r"stem.conv.\g<rest>"),
        (r"^bn1\.(?P<rest>.+)$", r"stem.bn.\g<rest>"),
        (_RESNET_BLOCK + shortcut + r"\.0\.(?P<rest>.+)$", _stage("shortcut.conv.")),
        (_RESNET_BLOCK + shortcut + r"\.1\.(?P<rest>.+)$", _stage("shortcut.bn.")),
        (_RESNET_BLOCK + r"(?P<rest>(conv|bn)[123]\..+)$", _stage("")),
        (rf"^{classifier}\.(?P<rest>.+)$", r"head.fc.\g<rest>"),
    )


RULES: dict[str, list[Rule]] = {
    "CifarResNet": _resnet_rules("downsample", "fc"),  # models/resnet.py: layer1-3, downsample.0/1, fc
    "ResNet": _resnet_rules("shortcut", "linear"),  # models/resnetv2.py (ResNet18/34/50): layer1-4, shortcut, linear
    # models/wrn.py: conv1, block1-3.layer.<i> (bn1, conv1, bn2, conv2, convShortcut), bn1, fc
    "WideResNet": _rules(
        (r"^conv1\.(?P<rest>.+)$", r"stem.\g<rest>"),
        (r"^block(?P<stage>\d)\.layer\.(?P<block>\d+)\.convShortcut\.(?P<rest>.+)$", _stage("shortcut.")),
        (r"^block(?P<stage>\d)\.layer\.(?P<block>\d+)\.(?P<rest>(conv|bn)[12]\..+)$", _stage("")),
        (r"^bn1\.(?P<rest>.+)$", r"head.pre.bn.\g<rest>"),
        (r"^fc\.(?P<rest>.+)$", r"head.fc.\g<rest>"),
    ),
    # models/vgg.py (batch_norm=True): block0-4 are Sequentials of (conv, BN, ReLU) triples, then classifier
    "VGG": _rules(
        (r"^block(?P<b>\d)\.(?P<i>\d+)\.(?P<rest>.+)$", lambda m: _vgg_layer(int(m["b"]), int(m["i"]), m["rest"])),
        (r"^classifier\.(?P<rest>.+)$", r"head.fc.\g<rest>"),
    ),
    # models/ShuffleNetv2.py: conv1, bn1, layer1-3 (conv/bn 1-5 per block), conv2, bn2, linear
    "ShuffleNetV2": _rules(
        (r"^conv1\.(?P<rest>.+)$", r"stem.conv.\g<rest>"),
        (r"^bn1\.(?P<rest>.+)$", r"stem.bn.\g<rest>"),
        (_RESNET_BLOCK + r"(?P<rest>(conv|bn)[1-5]\..+)$", _stage("")),
        (r"^conv2\.(?P<rest>.+)$", r"head.pre.conv.\g<rest>"),
        (r"^bn2\.(?P<rest>.+)$", r"head.pre.bn.\g<rest>"),
        (r"^linear\.(?P<rest>.+)$", r"head.fc.\g<rest>"),
    ),
}
RULES["ShuffleNetV1"] = RULES["ResNet"]  # models/ShuffleNetv1.py: conv1, bn1, layer1-3 (conv/bn 1-3), linear
MOBILENET_BLOCKS = (1, 2, 3, 4, 3, 3, 1)  # models/mobilenetv2.py: the `n` of each row of its block settings
MOBILENET_LAYERS = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}  # in `conv`


def mobilenet_rules(model: torch.nn.Module) -> list[Rule]:
    """models/mobilenetv2.py: conv1 (conv, BN), blocks.<b>.<i>.conv.<k> for the 7 block settings, conv2, classifier.0.
    Its blocks are ours in order, grouped by setting rather than by resolution."""
    ours = [f"stages.{s}.{j}" for s, stage in enumerate(model.stages) for j in range(len(stage))]
    first = [sum(MOBILENET_BLOCKS[:b]) for b in range(len(MOBILENET_BLOCKS))]

    def block(m: re.Match) -> str:
        index = first[int(m["b"])] + int(m["i"]) if int(m["b"]) < len(first) else len(ours)
        where = ours[index] if index < len(ours) else f"<beyond the {len(ours)} blocks>"
        return f"{where}.{MOBILENET_LAYERS.get(m['k'], '<no such layer>')}.{m['rest']}"

    return _rules(
        (r"^conv1\.0\.(?P<rest>.+)$", r"stem.conv.\g<rest>"),
        (r"^conv1\.1\.(?P<rest>.+)$", r"stem.bn.\g<rest>"),
        (r"^blocks\.(?P<b>\d+)\.(?P<i>\d+)\.conv\.(?P<k>\d+)\.(?P<rest>.+)$", block),
        (r"^conv2\.0\.(?P<rest>.+)$", r"head.pre.conv.\g<rest>"),
        (r"^conv2\.1\.(?P<rest>.+)$", r"head.pre.bn.\g<rest>"),
        (r"^classifier\.0\.(?P<rest>.+)$", r"head.fc.\g<rest>"),
    )


def _vgg_layer(block: int, index: int, rest: str) -> str:
    where = "stem" if block == 0 else f"stages.{block - 1}"
    layer, kind = divmod(index, 3)
    if kind == 2:
        return f"<no parameters at block{block}.{index}>"  # a ReLU: it holds none, so no real key gets here
    return f"{where}.{layer}.{'conv' if kind == 0 else 'bn'}.{rest}"


PEERS = "RepDistiller/mdistiller"


def to_zoo_layout(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`state` in `model`'s key layout: as it is when it already is (or only lacks DataParallel's `module.`
    prefix, or, for an outside model, the `model.` of the wrapper it sits in), else renamed by the model family's
    rules. A key no rule takes is an error naming it."""
    expected = set(model.state_dict())
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if set(state) - expected and hasattr(model, "model") and not any(k.startswith("model.") for k in state):
        hint = getattr(model, "own_layout_hint", None)  # transformers renames keys as it loads: its files do not fit
        if {f"model.{k}" for k in state} <= expected:
            state = {f"model.{k}": v for k, v in state.items()}  # an outside model's own file, without our wrapper
        elif hint:
            raise CheckpointError(f"{where}: its keys ({next(iter(state))!r}, ...) are neither distillab's nor the "
                                  f"wrapped {type(model.model).__name__}'s: {hint}")
    if not set(state) - expected:
        return state
    family = type(model).__name__
    rules = mobilenet_rules(model) if family == "MobileNetV2" else RULES.get(family)
    if rules is None:
        return state  # not a family we map: the usual key check names what is wrong
    out = {}
    for key, value in state.items():
        for pattern, rename in rules:
            match = pattern.match(key)
            if match:
                out[rename(match)] = value
                break
        else:
            if key in expected:
                out[key] = value
                continue
            raise CheckpointError(f"{where}: key {key!r} is in neither distillab's {family} layout nor {PEERS}'s "
                                  "(layout not recognised)")
    return out
