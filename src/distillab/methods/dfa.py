"""`dfa`: Guan et al., "Differentiable Feature Aggregation Search for Knowledge Distillation" (ECCV 2020), stage 2.

For every group i (a stage of the teacher: its block outputs share one resolution; the stem is excluded) the
target is the aggregation A_i = sum_j alpha_i^j T_i^j of the teacher's block outputs (Eq. 2), and
L = ce_weight * CE + fd_weight * sum_i MSE(BN(Conv1x1(S_i)), A_i), S_i the student's stage output (Eqs. 3-4, the
spec's Option A: identity teacher transform, mean squared error summed over groups; no logit KD).
`distance: overhaul` is the spec's Option B, Overhaul's distance (`dfa_overhaul`): every map taken before its ReLU,
A_i = sum_j alpha_i^j max(T_i^j, m_i^j) (each candidate's margin-ReLU, its margin from its BatchNorm), and
fd = sum_i 2^(i-G+1) * partial_L2(BN(Conv1x1(S_i)), A_i) / batch size.

The weights alpha are fixed buffers (no gradient, saved in checkpoints): searched by stage 1 (`dfa_search`, run first
into <run>/stages/search when `mode: searched` names no `weights`) and read from its aggregation.json, or from an
existing one (`weights`), or the ablations `last` (one-hot on
the last block: plain feature distillation, Eq. 1), `average` (uniform) and `random` (softmax of seeded N(0, 1)).
`method.options.search` holds the stage-1 options; stage 2 ignores them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from distillab.errors import ConfigError
from distillab.features import FeatureTap, feature_shapes
from distillab.methods.base import Method, MethodOptions, register
from distillab.methods.capabilities import MultiStage, Stage
from distillab.methods.dfa_overhaul import margin_relu, partial_l2, preact_candidates, stage_weights
from distillab.models.blocks import init_conv_fan_out
from distillab.roles import roles

AGGREGATION_FILE = "aggregation.json"


class DFASearchOptions(MethodOptions):
    """Stage 1 of `dfa` (its `method.options.search`): Algorithm 1, first order, one group after the other."""

    renamed: ClassVar[dict[str, str]] = {"gamma_ts": "ts_weight", "gamma_st": "st_weight"}
    epochs_per_group: int = Field(10, ge=1, description="I_s: passes over the D_w half per group; each step is one "
                                  "beta-step on D_beta and one w-step on D_w")
    warmup_epochs: int = Field(0, ge=0, description="epochs of plain CE on D_w before the first group (a warm student)")
    ts_weight: float = Field(1.0, ge=0, description="gamma_ts: weight of the teacher-to-student path (CE through "
                             "the student)")
    st_weight: float = Field(1.0, ge=0, description="gamma_st: weight of the student-to-teacher path (2 - 2cos)")
    beta_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the architecture parameters")
    beta_betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas of the architecture parameters")
    beta_l2: float = Field(1e-3, ge=0, description="lambda of lambda * ||beta_i||^2, added on the beta-step")
    w_lr: float = Field(0.05, gt=0, description="SGD learning rate (constant) of the student and connectors")
    w_momentum: float = Field(0.9, ge=0, lt=1)
    w_weight_decay: float = Field(5e-4, ge=0)
    add_student_ce: bool = Field(False, description="add CE(student(x), y) to the w-step loss")
    split_seed: int = Field(0, description="seed of the 50/50 split of the training set into D_w and D_beta")

    def stage_recipe(self) -> dict[str, Any]:
        """The w-step's optimizer and schedule, as train-config keys of the search stage."""
        return {"optim": {"name": "sgd", "lr": self.w_lr, "momentum": self.w_momentum, "nesterov": False,
                          "weight_decay": self.w_weight_decay, "grad_clip": None},
                "schedule": {"name": "constant", "warmup_epochs": 0.0},
                "find_unused_parameters": True}  # the other groups' connectors are idle in a step


class DFAOptions(MethodOptions):
    renamed: ClassVar[dict[str, str]] = {"gamma_fd": "fd_weight"}
    mode: Literal["searched", "last", "average", "random"] = Field(
        "searched", description="aggregation weights: from `weights` (searched), or the ablations")
    weights: Path | None = Field(None, description=f"an {AGGREGATION_FILE} (or its run directory) written by a "
                                 "search; unset with mode searched: search first, as a stage of this run")
    random_seed: int = Field(0, description="seed of the mode-random weights")
    fd_weight: float | None = Field(None, ge=0, description="gamma_fd: weight of the feature distance; required "
                                    "(the spec gives no default; mse: try 1, 10, 100; overhaul: Overhaul's CIFAR "
                                    "weight is 1e-3)")
    ce_weight: float = Field(1.0, ge=0)
    distance: Literal["mse", "overhaul"] = Field(
        "mse", description="stage-2 distance: mse (the block outputs, MSE per group, summed over groups) or "
        "overhaul (Heo et al. 2019: maps before their ReLU, the teacher's margin-ReLU, partial L2 with per-group "
        "weights 2^(i-G+1), summed and divided by the batch size)")
    search: DFASearchOptions = Field(DFASearchOptions(), description="stage-1 options: with mode searched and no "
                                     "weights, the search runs first, into <run>/stages/search")

    @model_validator(mode="after")
    def _fd_weight_is_set(self) -> DFAOptions:
        if self.fd_weight is None:  # checked with the config, before any data or teacher loads
            raise ValueError("fd_weight is required for dfa (the paper gives no value; the spec suggests trying 1, "
                             "10 and 100 with distance mse; Overhaul's own weight is 1e-3)")
        return self


# ---------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class Groups:
    """The groups shared by a teacher and a student: per stage, the teacher's candidate blocks and both widths."""

    names: list[list[str]]  # per stage, tap names of the teacher blocks whose output has the stage output's shape
    teacher_channels: list[int]
    student_channels: list[int]
    student_stages: list[str]  # tap names of the student's stage outputs

    @property
    def sizes(self) -> list[int]:
        return [len(n) for n in self.names]


def groups_by_roles(teacher: nn.Module, student: nn.Module, input_shape: tuple[int, int, int]) -> Groups:
    """Pair the stages of two models by their feature roles; they must have as many stages, at the same
    resolutions. The candidates of a group are the teacher's blocks of that stage shaped like its output."""
    t_info, s_info = roles(teacher, "teacher_layers"), roles(student, "student_layers")
    blocks = [list(stage.blocks) for stage in t_info.stages]
    t_shapes = feature_shapes(teacher, [b for stage in blocks for b in stage], input_shape)
    s_shapes = list(feature_shapes(student, s_info.stage_names, input_shape).values())
    stage_shapes = [t_shapes[stage[-1]] for stage in blocks]
    if [s[1:] for s in stage_shapes] != [s[1:] for s in s_shapes]:
        raise ConfigError(f"dfa pairs teacher and student stage by stage: their stage outputs must have the same "
                          f"resolutions, got teacher {stage_shapes} and student {s_shapes}")
    names = [[b for b in stage if t_shapes[b] == shape] for stage, shape in zip(blocks, stage_shapes, strict=True)]
    return Groups(names, [s[0] for s in stage_shapes], [s[0] for s in s_shapes], s_info.stage_names)


def aggregate(maps: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Eq. 2: sum_j weights[j] * maps[j]."""
    out = weights[0] * maps[0]
    for w, m in zip(weights[1:], maps[1:], strict=True):
        out = out + w * m
    return out


def teacher_groups(teacher: nn.Module, tap: FeatureTap, names: list[list[str]], x: torch.Tensor
                   ) -> list[list[torch.Tensor]]:
    """The teacher's maps of every group (`names`, which `tap` holds), without autograd."""
    with torch.no_grad():
        teacher(x)
    maps = dict(zip(tap.names, tap.take(), strict=True))
    return [[maps[n] for n in group] for group in names]


# ---------------------------------------------------------------------------------------------- weights
def fixed_weights(opts: DFAOptions, sizes: list[int]) -> list[torch.Tensor]:
    """The aggregation weights of each group for `opts.mode`."""
    if opts.mode == "searched":
        return read_aggregation(opts.weights, sizes)
    if opts.mode == "last":
        return [F.one_hot(torch.tensor(n - 1), n).float() for n in sizes]
    if opts.mode == "average":
        return [torch.full((n,), 1.0 / n) for n in sizes]
    gen = torch.Generator().manual_seed(opts.random_seed)
    return [torch.randn(n, generator=gen).softmax(0) for n in sizes]


def read_aggregation(path: Path | None, sizes: list[int]) -> list[torch.Tensor]:
    """The searched weights of an aggregation.json, checked against the teacher's group sizes."""
    if path is None:
        raise ConfigError("method.options.weights is not set: mode searched reads the aggregation.json of its "
                          "search stage (or choose mode last, average or random)")
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / AGGREGATION_FILE
    if not path.is_file():
        raise ConfigError(f"method.options.weights: {path} does not exist (leave weights unset to search first)")
    try:
        weights = [g["weights"] for g in json.loads(path.read_text())["groups"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"method.options.weights: {path} is not an aggregation file ({exc})") from None
    found = [len(w) for w in weights]
    if found != sizes:
        raise ConfigError(f"method.options.weights: {path} has groups of {found} weights but this teacher has "
                          f"{sizes} candidate maps per group (was it searched for another teacher?)")
    out = [torch.tensor(w, dtype=torch.float32) for w in weights]
    if any(bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-4 for w in out):
        raise ConfigError(f"method.options.weights: {path}: each group's weights must be >= 0 and sum to 1")
    return out


def feature_connector(student_channels: int, teacher_channels: int, he_init: bool = False) -> nn.Sequential:
    """F_s^i: Conv1x1 + BN from the student's stage width to the teacher's; `he_init`: the conv's weights drawn with
    std sqrt(2 / teacher_channels), as Overhaul's connector (otherwise torch's default)."""
    connector = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                              nn.BatchNorm2d(teacher_channels))
    if he_init:
        init_conv_fan_out(connector)
    return connector


# ---------------------------------------------------------------------------------------------- stage 2
@register("dfa")
class DFA(MultiStage, Method):
    caches_teacher = True  # the teacher runs on the batch's images only; its candidates are taps
    Options = DFAOptions

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        self.groups = groups_by_roles(teacher, student, self.input_shape)
        alphas = fixed_weights(self.opts, self.groups.sizes)
        for i, weights in enumerate(alphas):
            self.register_buffer(f"alpha_{i}", weights)
        # the teacher is read only where a weight is not 0 (mode last: one map per group)
        self.used = [[j for j, a in enumerate(weights.tolist()) if a > 0] for weights in alphas]
        overhaul = self.opts.distance == "overhaul"
        self.connectors = nn.ModuleList(feature_connector(cs, ct, he_init=overhaul) for cs, ct in
                                        zip(self.groups.student_channels, self.groups.teacher_channels, strict=True))
        self.candidates = [[self.groups.names[i][j] for j in used] for i, used in enumerate(self.used)]
        student_maps = self.groups.student_stages
        if overhaul:  # the same blocks before their ReLU, and their margins (from the loaded teacher; saved)
            self.candidates, margins = preact_candidates(teacher, self.candidates, self.groups.teacher_channels)
            for i, group_margins in enumerate(margins):
                self.register_buffer(f"margin_{i}", group_margins)
            student_maps = [s.next_preact or s.name for s in roles(student).stages]
        self.student_tap = self.tap(student, student_maps)
        self.teacher_tap = self.tap(teacher, [n for names in self.candidates for n in names])

    @classmethod
    def stages(cls, options: DFAOptions) -> list[Stage]:
        """Mode searched without `weights`: the search (`dfa_search`) first, then distil with what it found."""
        if options.mode != "searched" or options.weights is not None:
            return []
        return [Stage("search", "dfa_search", options.search.model_dump(mode="json"), options.search.stage_recipe(),
                      link=lambda opts, stage_dir: {**opts, "weights": str(stage_dir / AGGREGATION_FILE)})]

    @property
    def alphas(self) -> list[torch.Tensor]:
        return [getattr(self, f"alpha_{i}") for i in range(len(self.groups.sizes))]

    @property
    def margins(self) -> list[torch.Tensor]:
        """distance overhaul: per group, the margins (used candidates x channels)."""
        return [getattr(self, f"margin_{i}") for i in range(len(self.groups.sizes))]

    def write_outputs(self, run_dir: Path) -> dict[str, Any]:
        return {"aggregation": [alpha.tolist() for alpha in self.alphas]}  # the weights distilled with, per group

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        student_maps = [c(s).float() for c, s in zip(self.connectors, self.student_tap.take(), strict=True)]
        teacher_maps = teacher_groups(self.teacher, self.teacher_tap, self.candidates, images)
        weights = [alpha[used] for alpha, used in zip(self.alphas, self.used, strict=True)]
        if self.opts.distance == "overhaul":
            targets = [aggregate([margin_relu(t.float(), m) for t, m in zip(maps, margins, strict=True)], w)
                       for maps, margins, w in zip(teacher_maps, self.margins, weights, strict=True)]
            fd = sum(factor * partial_l2(s, t) for factor, s, t in
                     zip(stage_weights(len(targets)), student_maps, targets, strict=True)) / images.shape[0]
        else:
            fd = sum(F.mse_loss(s, aggregate(t, w).float())
                     for s, t, w in zip(student_maps, teacher_maps, weights, strict=True))
        return logits, {
            "ce": self.opts.ce_weight * F.cross_entropy(logits, labels),
            "fd": self.opts.fd_weight * fd,
        }
