"""`rdr`: RDR (reconstructed), progressive distillation through re-parameterized student branches.

Yao et al., "Progressively Knowledge Distillation via Re-parameterizing Diffusion Reverse Process", AAAI 2024.
A reconstruction from the abstract (spec `shared/methods/rdr.md`, `docs/methods/rdr.md`; everything beyond the
abstract is a design choice and a configurable option). The last conv(+BN) before global pooling of the student
becomes K parallel linear branches. Each step their outputs are taken in a random order; the running partial
sums, plus the block's shortcut, give K student features f_1..f_K. Through a shared bridge (1×1 conv + BN) each
f_k regresses its own target on a path from a fixed start x_0 to the teacher feature t:

    target_k = mixA(ā_k)·t + mixB(ā_k)·x_0 + σ_k·ε,   ā_K = 1, so target_K = t
    L = ce·CE + β·Σ_k w_k·MSE(g(f_k), target_k) [+ kd·T²·KL] [+ tg·mean_{k<K} CE(head(act(f_k)))]

By default x_0 = 0 and the mix is linear, so target_k = (k/K)·t: the share of the teacher that k of the K
branches can give, since a partial sum in a random order is on average k/K of the full sum. `start: student`
(x_0 = sg(g(f_1)), the first design) moves with the student and drives the partial sums away from t; it is kept
as an ablation only. `start: initial` (x_0 = the bridged f_K of frozen copies of the network at initialisation)
gives intermediate targets that carry more than t: the student walks from where it started to t. The network
continues from act(f_K), the full sum, as the deployed one does.
`deploy()` merges the branches into the plain conv + BN of the unmodified architecture: same parameter
count and FLOPs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distillab.errors import ConfigError
from distillab.features import FeatureTap
from distillab.losses import kd_loss
from distillab.methods.base import Method, MethodOptions, register
from distillab.reparam import (
    RepBranches,
    branch_kernel_size,
    fuse_conv_bn_modules,
    load_into_conv_bn,
    merge_branches,
)
from distillab.roles import FeatureInfo, roles

Schedule = Literal["linear", "cosine"]
Mix = Literal["vp", "linear"]
Start = Literal["zero", "noise", "initial", "student", "student_plus_noise"]


# -- the diffusion-style schedule -------------------------------------------------------------------
def abar_schedule(steps: int, name: Schedule = "linear") -> list[float]:
    """ā_1..ā_K, increasing to ā_K = 1: linear k/K, or cosine cos²(π/2·(K−k)/K)."""
    if name == "linear":
        return [k / steps for k in range(1, steps + 1)]
    return [math.cos(math.pi / 2 * (steps - k) / steps) ** 2 for k in range(1, steps + 1)]


def mix_coefficients(abar: float, mix: Mix = "vp") -> tuple[float, float]:
    """(weight of the teacher feature, weight of x_0): vp (√ā, √(1−ā)) or linear (ā, 1−ā)."""
    if mix == "vp":
        return math.sqrt(abar), math.sqrt(1.0 - abar)
    return abar, 1.0 - abar


def trajectory_start(first: torch.Tensor, start: Start = "zero", sigma: float = 1.0) -> torch.Tensor:
    """x_0, the start of the path to the teacher: zero, pure noise (fresh each step), or (ablations of the first
    design, a start that moves with the student) the detached bridged f_1, or f_1 plus σ_0·noise. `initial` comes
    from frozen copies of the network (`RDR.initial_start`), not from here."""
    if start == "initial":
        raise ValueError("start 'initial' is the frozen initial network's feature: see RDR.initial_start")
    if start == "zero":
        return torch.zeros_like(first)
    if start == "noise":
        return torch.randn_like(first)
    if start == "student_plus_noise":
        return first.detach() + sigma * torch.randn_like(first)
    return first.detach()


def step_targets(teacher: torch.Tensor, start: torch.Tensor, abar: list[float], mix: Mix = "linear",
                 sigma_scale: float = 0.0) -> list[torch.Tensor]:
    """target_k = mixA(ā_k)·t + mixB(ā_k)·x_0 + σ_k·ε with σ_k = sigma_scale·√(1−ā_k); at ā = 1 it is t itself."""
    targets = []
    for a in abar:
        coef_t, coef_x = mix_coefficients(a, mix)
        target = teacher if coef_x == 0.0 else coef_t * teacher + coef_x * start
        sigma = sigma_scale * math.sqrt(1.0 - a)
        if sigma > 0:
            target = target + sigma * torch.randn_like(teacher)
        targets.append(target)
    return targets


def progressive_loss(predictions: list[torch.Tensor], targets: list[torch.Tensor],
                     weights: list[float]) -> torch.Tensor:
    """Σ_k w_k · mean-squared error of the k-th bridged student feature against its target."""
    return sum(w * F.mse_loss(p.float(), t.float()) for p, t, w in zip(predictions, targets, weights, strict=True))


# -- student features ---------------------------------------------------------------------------
def draw_order(steps: int, shuffle: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The order the branches are taken in this step, as an index tensor on `device`: a fresh permutation (that
    device's global RNG), or 0..K−1."""
    return torch.randperm(steps, device=device) if shuffle else torch.arange(steps, device=device)


def step_features(outputs: list[torch.Tensor], order: torch.Tensor | Sequence[int],
                  mode: str = "partial_sum") -> list[torch.Tensor]:
    """z_1..z_K: partial sums z_k = Σ_{j≤k} y_order[j] (`partial_sum`), or single branches y_order[k]. Eager, the
    order is read as Python ints (a host tensor: no device sync, no copy of the outputs); under torch.compile the
    outputs are stacked and taken by the index tensor, so the graph neither breaks nor guards on the order."""
    if torch.compiler.is_compiling():
        index = torch.as_tensor(order, dtype=torch.long).to(outputs[0].device, non_blocking=True)
        taken = list(torch.stack(outputs).index_select(0, index).unbind(0))
    else:
        taken = [outputs[j] for j in (order.tolist() if isinstance(order, torch.Tensor) else order)]
    if mode == "single_branch":
        return taken
    sums = [taken[0]]
    for y in taken[1:]:  # added one at a time, in order
        sums.append(sums[-1] + y)
    return sums


def as_feature_map(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W as it is; B×N×C tokens become B×C×√N×√N (a leading class token is dropped when N−1 is square)."""
    if x.dim() == 4:
        return x
    n = x.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise ConfigError(f"teacher tokens: {n} tokens are neither a square grid nor one class token plus one")
        x = x[:, 1:]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def align_spatial(x: torch.Tensor, size: tuple[int, int], mode: str = "pool") -> torch.Tensor:
    """`x` resized to `size`: adaptive average pooling (to a smaller size) or bilinear (to a larger one)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "pool":
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# -- locating and replacing the student's layer ---------------------------------------------------
@dataclass(frozen=True)
class Site:
    """Where the branches go: the replaced conv, the BN right after it (None for a bare conv), the block that
    holds them, and the tap of the student feature f (the layer output plus the block's shortcut, before
    the block's activation)."""

    conv: str
    bn: str | None
    block: str
    feature: str


def branch_site(info: FeatureInfo) -> str:
    """The last conv before global pooling (the roles' `last_conv`): where the branches go by default."""
    if info.last_conv is None:
        raise ConfigError("the student has no conv right before its global pooling: set method.options.where")
    return info.last_conv


def locate(student: nn.Module, where: str) -> Site:
    """The site of the conv named `where`: the BN that follows it among its siblings, and its block's feature."""
    modules = dict(student.named_modules())
    conv = modules.get(where)
    if not isinstance(conv, nn.Conv2d) or "." not in where:
        raise ConfigError(f"method.options.where: {where!r} is not a Conv2d inside a block of "
                          f"{type(student).__name__}")
    block, _, child = where.rpartition(".")
    siblings = list(modules[block].named_children())
    names = [n for n, _ in siblings]
    after = siblings[names.index(child) + 1:]
    bn = None
    if after and isinstance(after[0][1], _BatchNorm) and after[0][1].num_features == conv.out_channels:
        bn = f"{block}.{after[0][0]}"
    relu = getattr(modules[block], "relu", None)
    feature = f"{block}.relu:input" if isinstance(relu, nn.ReLU) else block
    return Site(where, bn, block, feature)


def check_site(student: nn.Module, site: Site, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Check by a dry run (eval mode) that the BN consumes the conv's output and that the feature is the layer
    output plus a term independent of it (so partial sums give partial features); returns the feature shape."""
    param = next(student.parameters())
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(param)
    layer = student.get_submodule(site.bn or site.conv)
    names = [site.conv, site.feature] + ([f"{site.bn}:input"] if site.bn else [])
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), FeatureTap(student, names) as tap:
            student(x)
            if site.bn and tap[f"{site.bn}:input"] is not tap[site.conv]:
                raise ConfigError(f"method.options.where: {site.bn!r} does not take the output of {site.conv!r}")
            feature = tap[site.feature]
            handle = layer.register_forward_hook(lambda _m, _i, out: out + 1.0)
            try:
                student(x)
            finally:
                handle.remove()
            shifted = tap[site.feature]
    finally:
        student.train(was_training)
    if not torch.allclose(shifted - feature, torch.ones_like(feature), atol=1e-3):
        raise ConfigError(f"method.options.where: the student feature {site.feature!r} is not the output of "
                          f"{site.bn or site.conv!r} plus a shortcut, so its branches cannot give partial features")
    return tuple(feature.shape[1:])


def branch_kinds(conv: nn.Conv2d, kinds: list[str] | None, steps: int) -> list[str]:
    """The branch kinds (default K copies of the replaced kernel), checked against the conv's geometry."""
    k = conv.kernel_size[0]
    if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.padding not in ((k // 2, k // 2), "same")
            or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1] or conv.padding_mode != "zeros"):
        raise ConfigError(f"method.options.where: {conv} is not a square odd-kernel 'same'-padded conv "
                          "with square stride and no dilation")
    return list(kinds) if kinds is not None else [f"{k}x{k}"] * steps


def init_branches(layer: RepBranches, conv: nn.Conv2d) -> None:
    """The first branch keeps the student's own initial kernel when its size matches; the other convs are drawn
    from N(0, s²), s = that kernel's std × k_replaced / k_branch (the fan scaling of the zoo's init rules)."""
    std = conv.weight.detach().std().item()
    with torch.no_grad():
        for index, branch in enumerate(layer.branches):
            branch_conv = getattr(branch, "conv", None)
            if branch_conv is None:
                continue
            if index == 0 and branch_conv.weight.shape == conv.weight.shape:
                branch_conv.weight.copy_(conv.weight)
            else:
                nn.init.normal_(branch_conv.weight, 0.0, std * conv.kernel_size[0] / branch_conv.kernel_size[0])


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def bridge(in_channels: int, out_channels: int) -> nn.Sequential:
    """The weak bridge g: 1×1 conv (no bias) + BN."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy without gradients whose BNs normalise with each batch's own statistics, in training and in
    evaluation mode alike (they keep no running statistics, so nothing in the copy ever changes)."""
    frozen = copy.deepcopy(module).requires_grad_(False)
    for m in frozen.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return frozen


# -- options and the method -----------------------------------------------------------------------
class RDROptions(MethodOptions):
    renamed: ClassVar[dict[str, str]] = {"beta": "rdr_weight", "kd_T": "temperature"}
    K: int = Field(4, ge=1, description="student features = branches = steps")
    where: str | None = Field(None, description="the replaced conv; default: the last conv before global pooling")
    branch_kinds: list[str] | None = Field(None, description="'kxk' or 'identity' per branch; default K x the kernel")
    branch_bn_gamma_init: float = 1.0
    shuffle: bool = Field(True, description="re-draw the branch order every step; false: fixed order")
    features: Literal["partial_sum", "single_branch"] = "partial_sum"
    schedule: Schedule = "linear"
    mix: Mix = "linear"
    start: Start = Field("zero", description="x_0: zero or noise; initial: the bridged feature of the network as it "
                         "was at initialisation (frozen copies); student, student_plus_noise: first design")
    start_sigma: float = Field(1.0, ge=0, description="σ_0 of start=student_plus_noise")
    sigma_scale: float = Field(0.0, ge=0)
    bridge: Literal["shared", "per_step"] = "shared"
    teacher_feature: Literal["preact", "postact"] = "preact"
    teacher_layer: str | None = Field(None, description="tap name of the teacher feature (overrides teacher_feature)")
    align_spatial: Literal["pool", "bilinear"] = Field("pool", description="pool the larger map, or upsample")
    rdr_weight: float = Field(1.0, ge=0, description="weight of the progressive term (beta in our notes)")
    w_k: list[float] | None = Field(None, description="per-step weights; default 1/K each")
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(0.0, ge=0)
    temperature: float = Field(4.0, gt=0, description="temperature of the optional KD term")
    target_guided: bool = False
    tg_weight: float = Field(1.0, ge=0)
    fuse_bn: bool = Field(False, description="deploy the merged layer as one conv with bias (not the plain structure)")

    @field_validator("branch_kinds", "w_k")
    @classmethod
    def _one_per_step(cls, value: list | None, info: ValidationInfo) -> list | None:
        steps = info.data.get("K")
        if value is not None and steps is not None and len(value) != steps:
            raise ValueError(f"needs K={steps} entries, got {len(value)}")
        return value

    @field_validator("branch_kinds")
    @classmethod
    def _known_kinds(cls, value: list[str] | None) -> list[str] | None:
        for kind in value or []:
            branch_kernel_size(kind)
        return value


@register("rdr")
class RDR(Method):
    Options = RDROptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        opts = self.opts
        info = roles(student, "where") if opts.where is None or opts.target_guided else None
        self.site = locate(student, opts.where or branch_site(info))
        self._prepool, self._classifier = (info.prepool, info.classifier) if info else (None, None)
        if opts.target_guided and self._classifier is None:
            raise ConfigError("method.options.target_guided needs the student's classifier layer (feature roles)")
        if opts.target_guided and self.site.block not in (info.prepool, info.stages[-1].blocks[-1]):
            raise ConfigError("method.options.target_guided needs the replaced layer in the student's last block or "
                              "in the module before its global pooling")
        conv = student.get_submodule(self.site.conv)
        bn = student.get_submodule(self.site.bn) if self.site.bn else None
        kinds = branch_kinds(conv, opts.branch_kinds, opts.K)
        try:
            layer = RepBranches(conv.in_channels, conv.out_channels, conv.kernel_size[0], kinds, conv.stride[0],
                                conv.groups, with_bn=bn is not None, bn_gamma_init=opts.branch_bn_gamma_init)
        except ValueError as exc:
            raise ConfigError(f"method.options.branch_kinds: {exc} (replacing {self.site.conv!r})") from None
        feature_shape = check_site(student, self.site, self.input_shape)
        # A plain copy for deploy, set around nn.Module so that it stays out of state_dict and .to().
        object.__setattr__(self, "_plain_template", copy.deepcopy(student))
        init_branches(layer, conv)
        replace_module(student, self.site.conv, layer.to(conv.weight))
        if bn is not None:
            replace_module(student, self.site.bn, nn.Identity())
        self._replaced_params = sum(p.numel() for m in (conv, bn) if m is not None for p in m.parameters())

        self.teacher_name = opts.teacher_layer or teacher_feature_name(roles(teacher, "teacher_layer"),
                                                                       opts.teacher_feature)
        teacher_shape = self.shapes(teacher, [self.teacher_name])[self.teacher_name]
        teacher_channels = teacher_shape[-1] if len(teacher_shape) == 2 else teacher_shape[0]
        self.bridge = (bridge(feature_shape[0], teacher_channels) if opts.bridge == "shared" else
                       nn.ModuleList(bridge(feature_shape[0], teacher_channels) for _ in range(opts.K)))
        self.abar = abar_schedule(opts.K, opts.schedule)
        self.weights = opts.w_k or [1.0 / opts.K] * opts.K
        # start: initial: the student and the bridge that maps f_K, frozen as they are now (copied before any tap
        # hooks them); at K = 1 no target reads x_0, so none is kept
        self.initial = None
        if opts.start == "initial" and opts.K > 1:
            last_bridge = self.bridge if opts.bridge == "shared" else self.bridge[-1]
            self.initial = nn.ModuleDict({"student": frozen_copy(student), "bridge": frozen_copy(last_bridge)})
            self.initial_tap = self.tap(self.initial["student"], [self.site.feature])
        branch_names = [f"{self.site.conv}.branches.{i}" for i in range(opts.K)]
        self.student_tap = self.tap(student, [*branch_names, self.site.conv, self.site.feature])
        self.teacher_tap = self.tap(teacher, [self.teacher_name])

    # -- training ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        opts = self.opts
        logits = self.student(images)
        *outputs, layer_output, feature = self.student_tap.take()
        teacher_logits = self.teacher_forward(images)
        (teacher_feature,) = self.teacher_tap.take()
        shortcut = feature - layer_output  # what the block adds to the layer's output (0 when nothing)
        # compiled: drawn on the device, inside the graph; eager: on the host, read without a device sync
        order = draw_order(opts.K, opts.shuffle, images.device if torch.compiler.is_compiling() else "cpu")
        features = [z + shortcut for z in step_features(outputs, order, opts.features)]
        bridged = self.bridged(features)
        target = as_feature_map(teacher_feature).float()
        size = _common_size(bridged[0], target, opts.align_spatial)
        bridged = [align_spatial(h, size, opts.align_spatial) for h in bridged]
        target = align_spatial(target, size, opts.align_spatial)
        if opts.start == "initial":
            start = self.initial_start(images, target)
        else:
            start = trajectory_start(bridged[0].float(), opts.start, opts.start_sigma)
        targets = step_targets(target, start, self.abar, opts.mix, opts.sigma_scale)
        terms = {
            "ce": opts.ce_weight * F.cross_entropy(logits, labels),
            "rdr": opts.rdr_weight * progressive_loss(bridged, targets, self.weights),
        }
        if opts.kd_weight > 0:
            terms["kd"] = opts.kd_weight * kd_loss(logits, teacher_logits, opts.temperature)
        if opts.target_guided and opts.K > 1:
            partial_logits = self.logits_from_feature(torch.cat(features[:-1]))
            terms["tg"] = opts.tg_weight * F.cross_entropy(partial_logits, labels.repeat(opts.K - 1))
        return logits, terms

    @torch.no_grad()
    def initial_start(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """x_0 of `start: initial`, shaped like the aligned `target`: the feature f_K of the student as it was at
        initialisation, through the bridge as it was then (frozen copies; their BNs take the batch's statistics).
        Zero at K = 1, where no target reads it."""
        if self.initial is None:
            return torch.zeros_like(target)
        self.initial["student"](images)
        (feature,) = self.initial_tap.take()
        return align_spatial(self.initial["bridge"](feature).float(), tuple(target.shape[-2:]), self.opts.align_spatial)

    def bridged(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """g(f_k) for every k: one call of the shared bridge on the K·B batch (one BN over all), or a bridge per k."""
        if isinstance(self.bridge, nn.ModuleList):
            return [g(f) for g, f in zip(self.bridge, features, strict=True)]
        return list(self.bridge(torch.cat(features)).split(features[0].shape[0]))

    def logits_from_feature(self, feature: torch.Tensor) -> torch.Tensor:
        """The student's logits continued from a feature f: its block's activation, the layers up to the pre-pool
        map (when f is the last block's), global average pooling, the classifier (all by role)."""
        block = self.student.get_submodule(self.site.block)
        act = block.relu(feature) if self.site.feature.endswith(":input") else feature
        if self.site.block != self._prepool:
            act = self.student.get_submodule(self._prepool)(act)
        return self.student.get_submodule(self._classifier)(act.mean(dim=(2, 3)))

    # -- deployment -------------------------------------------------------------------------------
    @property
    def branches(self) -> RepBranches:
        return self.student.get_submodule(self.site.conv)

    @property
    def deploy_folds_bn(self) -> bool:
        return self.opts.fuse_bn

    def deploy(self) -> nn.Module:
        """The plain student architecture with every branch merged into the replaced conv (+ BN); no bridge.

        With `fuse_bn` the merged layer becomes one conv with a bias and its BN an identity.
        """
        layer = self.branches
        param = next(layer.parameters(), next(self.student.parameters()))
        plain = copy.deepcopy(self._plain_template).to(device=param.device, dtype=param.dtype)
        prefix = f"{self.site.conv}."
        state = {k: v for k, v in self.student.state_dict().items() if not k.startswith(prefix)}
        missing, unexpected = plain.load_state_dict(state, strict=False)
        own = (self.site.conv, self.site.bn)
        if unexpected or any(k.rpartition(".")[0] not in own for k in missing):
            raise RuntimeError(f"the training student does not match its plain copy: {unexpected[:3]}, {missing[:3]}")
        weight, bias = merge_branches(layer)
        conv = plain.get_submodule(self.site.conv)
        bn = plain.get_submodule(self.site.bn) if self.site.bn else None
        load_into_conv_bn(conv, bn, weight.to(param.dtype), bias.to(param.dtype))
        if self.opts.fuse_bn and bn is not None:
            replace_module(plain, self.site.conv, fuse_conv_bn_modules(conv, bn.eval()))
            replace_module(plain, self.site.bn, nn.Identity())
        return plain

    def side_parameter_count(self) -> int:
        """The bridge plus what the branches add to the replaced layer."""
        branches = sum(p.numel() for p in self.branches.parameters())
        frozen = sum(p.numel() for p in self.initial.parameters()) if self.initial is not None else 0
        return super().side_parameter_count() + branches - self._replaced_params - frozen


def teacher_feature_name(info: FeatureInfo, which: str) -> str:
    """The teacher's pre-pool map (`postact`), or the same before its final activation (`preact`; the last stage
    output itself where it ends without one)."""
    if which == "postact":
        return info.prepool
    return info.prepool_preact or info.stage_preacts[-1]


def _common_size(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> tuple[int, int]:
    pick = min if mode == "pool" else max
    return pick(student.shape[-2], teacher.shape[-2]), pick(student.shape[-1], teacher.shape[-1])
