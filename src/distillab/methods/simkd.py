"""`simkd`: Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (CVPR 2022).

The student's pre-pool map goes through a projector P (1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv, BN,
ReLU; from the student's channels to the teacher's through a bottleneck of C_t / factor) and is regressed onto
the teacher's pre-pool map. The logits are the teacher's frozen classifier on the globally pooled projected map:

    L = feature_weight * MSE(P(F_s), F_t)  [+ ce_weight * CE(fc_t(pool(P(F_s))), y)]

CIFAR-100 as the official code runs it (DefangChen/SimKD, `-c 0 -d 0 -b 1`, factor 2): the MSE alone. Where the
two maps differ in size, the larger is average-pooled to the smaller first (the student's before P). What is
deployed, evaluated during training, saved and exported is `SimKDNetwork`: the student up to its map, P and the
teacher's classifier, not the bare student.

Departures from the official code: sizes are compared per axis (it compares heights and pools to a square);
`ce_weight` weighs CE on the deployed logits (its `-c` weighs CE on the student's own classifier, 0 in the
recipe); the student's own classifier, which no term reaches, is frozen (so that DDP finds no unused trainable
parameter) and stays in the deployed network's file, its output unused, so that the student's part matches a
stock model. The teacher's head is reproduced as global average pooling and its final Linear: a teacher that
does more between the two (a norm) is not.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillab.errors import CheckpointError, ConfigError
from distillab.features import FeatureTap
from distillab.methods.base import Method, MethodOptions, register
from distillab.roles import FeatureInfo, roles


def projector(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """SimKD's bottleneck projector: conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 -> BN -> ReLU, with
    bias-free convs and an ordinary (not grouped) 3x3 conv, as in the official code."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, 1, bias=False), nn.BatchNorm2d(hidden_channels), nn.ReLU(),
        nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1, bias=False), nn.BatchNorm2d(hidden_channels),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class SimKDNetwork(nn.Module):
    """What SimKD deploys: `student` up to its tapped map `feature`, (average-pooled to `pool_to` where set) the
    projector, global average pooling and the teacher's `classifier`. `forward(images)` returns the logits; the
    student's own output is discarded."""

    def __init__(self, student: nn.Module, feature: str, projector: nn.Module, classifier: nn.Linear,
                 pool_to: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.classifier = classifier
        self.feature = feature
        self.pool_to = pool_to

    def head(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected map, logits) of a student map."""
        if self.pool_to is not None and tuple(feature.shape[-2:]) != self.pool_to:
            feature = F.adaptive_avg_pool2d(feature, self.pool_to)
        projected = self.projector(feature)
        return projected, self.classifier(F.adaptive_avg_pool2d(projected, 1).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with FeatureTap(self.student, [self.feature]) as tap:  # hooked for this call only: nothing stays behind
            self.student(images)
        return self.head(tap[self.feature])[1]


class SimKDOptions(MethodOptions):
    feature_weight: float = Field(1.0, ge=0, description="weight of the MSE between the projected student map and "
                                  "the teacher's (official code: -b 1)")
    ce_weight: float = Field(0.0, ge=0, description="weight of CE on the deployed logits (official code: -c 0)")
    factor: int = Field(2, ge=1, description="projector bottleneck: C_t // factor hidden channels")
    student_layer: str | None = Field(None, description="tap name of the student map; default: its pre-pool map")
    teacher_layer: str | None = Field(None, description="tap name of the teacher map; default: its pre-pool map, "
                                      "whose pooled vector its classifier takes")
    teacher_classifier: str | None = Field(None, description="module path of the teacher's final Linear; default: "
                                           "from its roles")


@register("simkd")
class SimKD(Method):
    Options = SimKDOptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        o = self.opts
        t_info = None
        if o.teacher_layer is None or o.teacher_classifier is None:
            t_info = roles(teacher, "teacher_layer" if o.teacher_layer is None else "teacher_classifier")
        s_info = _roles_or_none(student) if o.student_layer else roles(student, "student_layer")
        s_name = o.student_layer or s_info.prepool
        t_name = o.teacher_layer or t_info.prepool
        fc = _teacher_classifier(teacher, o.teacher_classifier or t_info.classifier)
        s_shape = self.shapes(student, [s_name])[s_name]
        t_shape = self.shapes(teacher, [t_name])[t_name]
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(f"simkd needs C x H x W maps: the student's {s_name} is {s_shape}, the teacher's "
                              f"{t_name} is {t_shape}")
        if t_shape[0] != fc.in_features:
            raise ConfigError(f"simkd: the teacher's {t_name} has {t_shape[0]} channels, but its classifier takes "
                              f"{fc.in_features}")
        hidden = t_shape[0] // o.factor
        if hidden < 1:
            raise ConfigError(f"method.options.factor={o.factor} leaves no channel of the teacher's {t_shape[0]}")
        size = (min(s_shape[1], t_shape[1]), min(s_shape[2], t_shape[2]))
        self.target_size = size if tuple(t_shape[1:]) != size else None  # the teacher's map pooled to this
        self.projector = projector(s_shape[0], hidden, t_shape[0])
        self.classifier = copy.deepcopy(fc).requires_grad_(False)
        if s_info is not None and s_info.classifier is not None:  # reached by no term: frozen, see the docstring
            student.get_submodule(s_info.classifier).requires_grad_(False)
        self.student_tap = self.tap(student, [s_name])
        self.teacher_tap = self.tap(teacher, [t_name])
        # beside the method's modules, not among them: its modules are the method's own, stored once
        object.__setattr__(self, "_network", SimKDNetwork(student, s_name, self.projector, self.classifier,
                                                          size if tuple(s_shape[1:]) != size else None))

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        self.student(images)
        self.teacher_forward(images)
        (f_s,), (f_t,) = self.student_tap.take(), self.teacher_tap.take()
        projected, logits = self._network.head(f_s)
        if self.target_size is not None:
            f_t = F.adaptive_avg_pool2d(f_t, self.target_size)
        terms = {"feature": self.opts.feature_weight * F.mse_loss(projected.float(), f_t.float())}
        if self.opts.ce_weight:
            terms["ce"] = self.opts.ce_weight * F.cross_entropy(logits, labels)
        return logits, terms

    def side_modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}  # the reused classifier is the teacher's, frozen: not a trained side

    @property
    def deployed_network(self) -> SimKDNetwork:
        network = self._network
        network.training = self.training  # its own flag is not set by the method's train()/eval(): follow it
        return network

    def deploy_card(self) -> dict[str, Any]:
        net = self._network
        convs = [m for m in net.projector.modules() if isinstance(m, nn.Conv2d)]
        return {"student_layer": net.feature, "channels": [convs[0].in_channels, convs[0].out_channels,
                                                           convs[-1].out_channels],
                "pool_to": list(net.pool_to) if net.pool_to is not None else None,
                "num_classes": net.classifier.out_features, "bias": net.classifier.bias is not None}

    @classmethod
    def rebuild_deployed(cls, student: nn.Module, card: dict[str, Any]) -> SimKDNetwork:
        try:
            c_in, hidden, c_out = (int(c) for c in card["channels"])
            pool_to = card["pool_to"]
            return SimKDNetwork(student, str(card["student_layer"]), projector(c_in, hidden, c_out),
                                nn.Linear(c_out, int(card["num_classes"]), bias=bool(card["bias"])),
                                tuple(int(s) for s in pool_to) if pool_to is not None else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"simkd model card: bad deploy entries {card!r} ({exc!r})") from None


def _roles_or_none(model: nn.Module) -> FeatureInfo | None:
    try:
        return roles(model)
    except ConfigError:
        return None


def _teacher_classifier(teacher: nn.Module, name: str | None) -> nn.Linear:
    if name is None:
        raise ConfigError(f"{type(teacher).__name__} declares no classifier: set method.options.teacher_classifier "
                          "to the module path of its final Linear")
    try:
        fc = teacher.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"method.options.teacher_classifier: the teacher has no module {name!r}") from None
    if not isinstance(fc, nn.Linear):
        raise ConfigError(f"simkd reuses the teacher's final Linear: its {name} is a {type(fc).__name__}")
    return fc
