"""`unikd`: Huang et al., "Harmonizing Knowledge Transfer in Neural Network with Unified Distillation" (ECCV 2024).

Intermediate knowledge is turned into the same distributional form as the logits:
- AFF fuses the student's stage outputs and pooled feature with a top-down chain of ReviewKD-style blocks
  (1x1 channel adjust, nearest upsampling, a 2-map sigmoid gate mixing adjacent levels); only the shallowest
  level's 3x3 projection to the teacher's stage-1 channels is used.
- FDP heads (one on the fused student map, one on the teacher's stage-1 pre-ReLU map, both trained) predict a
  diagonal Gaussian over K = number of classes and draw a reparameterised sample z.
- L = ce + ramp * logit (DKD or KD) + feat_weight * L_feat + supp_weight * (KD(z_s, logits_s) + KD(z_t, logits_t)),
  where L_feat is the temperature-softmax KL between the samples (`kl: sampled`, the authors' code) or the
  closed-form KL between the two Gaussians (`kl: closed_form`). That is the spec's Variant A (`logit_loss: dkd`).
- Variant B (`logit_loss: mlkd`, the authors' final configs): two views per batch (the loader's weak and strong
  views), the logit term is MLKD's (`distillab.methods.mlkd`: CE on both views, kd, cc and bc) with no warm-up,
  and the UniKD terms (feat, supp) are computed on each view and summed.
Nothing of UniKD is used at test time. Each evaluation on a validation split logs how often the FDP heads' modes
(and the student's logits) agree with the teacher's top-1 class (`probe`, `val_probe_*`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from distillab.errors import ConfigError
from distillab.losses import dkd_loss, gaussian_kl, kd_loss, mlkd_terms, warmup_factor
from distillab.methods.base import Method, MethodOptions, register
from distillab.methods.capabilities import StrongView, missing_input
from distillab.methods.reviewkd import gated_sum
from distillab.roles import FeatureInfo, roles

MAX_MID_CHANNELS = 512


def _conv_act(in_channels: int, out_channels: int, kernel_size: int, act: str) -> nn.Sequential:
    """Conv (no bias, 'same' padding, Kaiming-uniform a=1) then ReLU (`act: relu`) or BN (`act: bn`)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, nn.ReLU() if act == "relu" else nn.BatchNorm2d(out_channels))


class FusionBlock(nn.Module):
    """One level of the AFF chain: `mix` adjusts the level's channels and, unless it is the deepest level,
    gates it with the level above; `output` projects the mixed map to the teacher's channels (3x3)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int | None, fuse: bool, act: str) -> None:
        super().__init__()
        self.adjust = _conv_act(in_channels, mid_channels, 1, act)
        self.gate = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None
        self.project = _conv_act(mid_channels, out_channels, 3, act) if out_channels is not None else None

    def mix(self, x: torch.Tensor, above: torch.Tensor | None) -> torch.Tensor:
        a = self.adjust(x)
        if self.gate is not None:
            a = gated_sum(self.gate, a, F.interpolate(above, size=a.shape[-2:], mode="nearest"))
        return a

    def output(self, a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a, size=size, mode="nearest")
        return self.project(a)


class AdaptiveFeatureFusion(nn.Module):
    """AFF: top-down chain over the student's levels (given shallowest first; 2-D features count as 1x1 maps);
    returns the shallowest level's output, `out_channels[0]` x `out_size`.

    `out_channels[i]` is None for a level whose (unused) projection is not built. `fuse_with="deepest"` feeds
    every gate the deepest level's map instead of the level above (the authors' MLKD-based class)."""

    def __init__(self, in_channels: list[int], out_channels: list[int | None], out_size: tuple[int, int],
                 fuse_with: str = "previous", act: str = "relu") -> None:
        super().__init__()
        self.mid_channels = min(MAX_MID_CHANNELS, in_channels[-1])
        deepest = len(in_channels) - 1
        self.levels = nn.ModuleList(
            FusionBlock(c, self.mid_channels, out, fuse=i < deepest, act=act)
            for i, (c, out) in enumerate(zip(in_channels, out_channels, strict=True))
        )
        self.out_size = tuple(out_size)
        self.fuse_with = fuse_with

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = [f if f.dim() == 4 else f[:, :, None, None] for f in features]
        deepest = above = self.levels[-1].mix(maps[-1], None)
        for level, x in zip(reversed(self.levels[:-1]), reversed(maps[:-1]), strict=True):
            above = level.mix(x, above if self.fuse_with == "previous" else deepest)
        return self.levels[0].output(above, self.out_size)


class GaussianHead(nn.Module):
    """FDP: global average pool, then linear mean and log-variance heads; returns (z, mean, log_var) with the
    reparameterised sample z = mean + exp(log_var / 2) * noise (noise ~ N(0, I) unless given)."""

    def __init__(self, in_channels: int, out_features: int) -> None:
        super().__init__()
        self.mean = nn.Linear(in_channels, out_features)
        self.log_var = nn.Linear(in_channels, out_features)

    def forward(self, feature: torch.Tensor, noise: torch.Tensor | None = None):
        mean, log_var = self.moments(feature)
        noise = torch.randn_like(mean) if noise is None else noise
        return mean + torch.exp(0.5 * log_var) * noise, mean, log_var

    def moments(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_var) of the predicted Gaussian, without a sample."""
        pooled = feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature
        return self.mean(pooled), self.log_var(pooled)


def default_teacher_feature(info: FeatureInfo) -> str:
    """A teacher's stage-1 output before its final ReLU (the authors' `preact_feats[1]`): the input of the last
    block's ReLU, or for pre-activation WRNs the next block's BN output (the roles' `next_preact`); the stage output
    itself where no activation follows it (a transformer's, a linear bottleneck's)."""
    stage = info.stages[0]
    return stage.next_preact or stage.name


def aff_levels(info: FeatureInfo) -> list[str]:
    """Stage outputs then the pooled feature (the AFF levels, shallowest first)."""
    return [*info.stage_names, info.pooled]


class UniKDOptions(MethodOptions):
    renamed: ClassVar[dict[str, str]] = {"dkd_alpha": "tckd_weight", "dkd_beta": "nckd_weight"}
    ce_weight: float = Field(1.0, ge=0)
    logit_loss: Literal["dkd", "kd", "mlkd"] = Field(
        "dkd", description="logit term: DKD (spec Variant A), KD, or MLKD on two views (Variant B)")
    logit_weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0, description="temperature of the logit term")
    tckd_weight: float = Field(1.0, ge=0, description="TCKD weight (logit_loss: dkd)")
    nckd_weight: float = Field(8.0, ge=0, description="NCKD weight (logit_loss: dkd): DKD's per-pair value (8, 6 or "
                               "2)")
    warmup: int | None = Field(None, ge=0, description="epochs of linear warm-up of the logit term, "
                               "min(epoch/warmup, 1); default 20 for dkd and kd, none for mlkd")
    mlkd_quirk: bool = Field(True, description="logit_loss mlkd: the reference's strong-view KD sum takes T = 2 and "
                             "6 from the weak view")
    mlkd_cc_weight: float = Field(1.0, ge=0, description="logit_loss mlkd: weight of the class-correlation term "
                                  "(its scale grows as batch^2 / classes)")
    kl: Literal["sampled", "closed_form"] = Field(
        "sampled", description="feature constraint: softmax KL between samples, or the Gaussians' closed-form KL")
    kl_direction: Literal["t_to_s", "s_to_t"] = Field(
        "t_to_s", description="closed_form only: KL(N_t || N_s) or KL(N_s || N_t)")
    logvar_clamp: tuple[float, float] | None = Field(
        None, description="closed_form only: clamp both log-variances to (lo, hi) inside the KL")
    feat_weight: float = Field(1.0, ge=0)
    supp_weight: float = Field(1.0, ge=0)
    dist_temperature: float = Field(1.0, gt=0, description="T' of the sampled feature KL and the supp terms")
    detach_targets: bool = Field(False, description="stop gradients through z_t (mean_t, log_var_t) and logits_s")
    fuse_with: Literal["previous", "deepest"] = Field(
        "previous", description="what each gate mixes in: the level above, or the deepest level (author bug)")
    abf_act: Literal["relu", "bn"] = Field("relu", description="after each AFF conv: ReLU (author) or BN (ReviewKD)")
    prune_unused: bool = Field(False, description="do not build the deeper levels' unused 3x3 projections (never "
                               "built when student and teacher have different numbers of levels)")
    student_layers: list[str] | None = Field(
        None, description="tap names of the fused levels, shallowest first; default: stage outputs + pooled")
    teacher_layer: str | None = Field(None, description="tap name of the teacher feature; default: stage-1 pre-ReLU")

    @field_validator("logvar_clamp")
    @classmethod
    def _clamp_is_an_interval(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"must be (lo, hi) with lo < hi, got {value}")
        return value


@register("unikd")
class UniKD(StrongView, Method):
    caches_teacher = True  # Variant A; Variant B runs the teacher on the strong view too (set in __init__)
    Options = UniKDOptions
    probes = ("teacher_agree", "student_agree", "logits_agree")

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        o = self.opts
        s_names = o.student_layers or aff_levels(roles(student, "student_layers"))
        t_name = o.teacher_layer or default_teacher_feature(roles(teacher, "teacher_layer"))
        t_levels = [] if o.prune_unused else self._teacher_levels(teacher, len(s_names))
        prune = o.prune_unused or not t_levels
        s_shapes = self.shapes(student, [*s_names, ""])  # "" taps the whole model: its logits
        first = [] if o.teacher_layer else [roles(teacher).stages[0].name]
        t_shapes = self.shapes(teacher, [t_name, *t_levels, *first])
        t_shape = t_shapes[t_name]
        if len(t_shape) != 3:
            raise ConfigError(f"method.options.teacher_layer: {t_name!r} is not a feature map (shape {t_shape})")
        if first and t_shape != t_shapes[first[0]]:  # e.g. ShuffleV2: its ReLU sees half the map
            raise ConfigError(f"{type(teacher).__name__}'s stage-1 output has no single pre-ReLU map "
                              f"({t_name} is {t_shape}): set method.options.teacher_layer")
        deeper = [None] * (len(s_names) - 1) if prune else [t_shapes[n][0] for n in t_levels]
        self.aff = AdaptiveFeatureFusion([s_shapes[n][0] for n in s_names], [t_shape[0], *deeper], t_shape[1:],
                                         o.fuse_with, o.abf_act)
        self.fdp_student = GaussianHead(t_shape[0], s_shapes[""][0])
        self.fdp_teacher = GaussianHead(t_shape[0], s_shapes[""][0])
        self.student_tap = self.tap(student, s_names)
        self.teacher_tap = self.tap(teacher, [t_name])
        self.strong_view = o.logit_loss == "mlkd"
        self.caches_teacher = not self.strong_view

    @staticmethod
    def _teacher_levels(teacher: nn.Module, levels: int) -> list[str]:
        """The teacher's stages 2.. then pooled feature: they size the deeper levels' (unused) projections; none
        when the teacher has another number of levels than the student (or no roles)."""
        info = getattr(teacher, "feature_info", None)
        names = aff_levels(info)[1:] if isinstance(info, FeatureInfo) else []
        return names if len(names) == levels - 1 else []

    def forward(self, images: torch.Tensor, labels: torch.Tensor, strong: torch.Tensor | None = None):
        if self.strong_view and strong is None:  # logit_loss mlkd reads the strong view
            raise missing_input(self.name, "a strongly augmented view of each batch (logit_loss: mlkd)",
                                "method(images, labels, strong)",
                                "distillab.data.DeviceLoader(..., strong_view=True) makes it")
        o = self.opts
        views = [images] if strong is None else [images, strong]
        outputs = []  # per view: student logits and the fused map (two student forwards: BN sees one view each)
        for x in views:
            outputs.append((self.student(x), self.aff(self.student_tap.take())))
        with torch.no_grad():
            teacher_logits = self.teacher(torch.cat(views) if strong is not None else images).split(len(images))
            teacher_features = self.teacher_tap.take()[0].split(len(images))
        logits = outputs[0][0]
        terms = {"ce": o.ce_weight * sum(F.cross_entropy(s_logits, labels) for s_logits, _ in outputs)}
        if o.logit_loss == "mlkd":
            mlkd = mlkd_terms(logits, teacher_logits[0], outputs[1][0], teacher_logits[1], quirk=o.mlkd_quirk)
            mlkd["cc"] = o.mlkd_cc_weight * mlkd["cc"]
            terms.update({k: o.logit_weight * v for k, v in mlkd.items()})
        else:
            warmup = 20 if o.warmup is None else o.warmup
            ramp = warmup_factor(self.epoch_tensor, warmup)
            terms[o.logit_loss] = ramp * o.logit_weight * self._logit_loss(logits, teacher_logits[0], labels)
        feat = supp = 0.0
        for (s_logits, fused), t_logits, t_feature in zip(outputs, teacher_logits, teacher_features, strict=False):
            student_dist = self.fdp_student(fused)
            teacher_dist = self.fdp_teacher(t_feature)
            logits_target = s_logits.detach() if o.detach_targets else s_logits
            feat_target = tuple(t.detach() for t in teacher_dist) if o.detach_targets else teacher_dist
            feat = feat + self._feature_loss(student_dist, feat_target)
            supp = supp + (kd_loss(student_dist[0], logits_target, o.dist_temperature)
                           + kd_loss(teacher_dist[0], t_logits, o.dist_temperature))
        terms["feat"] = o.feat_weight * feat
        terms["supp"] = o.supp_weight * supp
        return logits, terms

    @torch.no_grad()
    def probe(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image, 100 where the argmax of an FDP head's predicted mean (its Gaussian's mode, no sample) is the
        teacher's own top-1 class, else 0: the teacher side (`teacher_agree`, from the teacher's map) and the
        student side (`student_agree`, from the fused student levels); `logits_agree`, the student's own top-1
        against the teacher's, is the reference for both."""
        teacher_top = self.teacher(images).argmax(1)
        (teacher_feature,) = self.teacher_tap.take()
        logits = self.student(images)
        fused = self.aff(self.student_tap.take())
        scores = {"teacher_agree": self.fdp_teacher.moments(teacher_feature)[0],
                  "student_agree": self.fdp_student.moments(fused)[0], "logits_agree": logits}
        return {name: 100.0 * (score.argmax(1) == teacher_top).float() for name, score in scores.items()}

    def _logit_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.logit_loss == "dkd":
            return dkd_loss(logits, teacher_logits, labels, o.tckd_weight, o.nckd_weight, o.temperature)
        return kd_loss(logits, teacher_logits, o.temperature)

    def _feature_loss(self, student_dist: tuple, teacher_dist: tuple) -> torch.Tensor:
        """The distribution constraint between the FDP outputs, each (z, mean, log_var)."""
        o = self.opts
        if o.kl == "sampled":
            return kd_loss(student_dist[0], teacher_dist[0], o.dist_temperature)
        (_, mean_s, log_var_s), (_, mean_t, log_var_t) = student_dist, teacher_dist
        if o.logvar_clamp is not None:
            log_var_s, log_var_t = log_var_s.clamp(*o.logvar_clamp), log_var_t.clamp(*o.logvar_clamp)
        if o.kl_direction == "t_to_s":
            return gaussian_kl(mean_t, log_var_t, mean_s, log_var_s)
        return gaussian_kl(mean_s, log_var_s, mean_t, log_var_t)
