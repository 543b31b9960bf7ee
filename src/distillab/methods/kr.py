"""`kr`: KR (reconstructed), "Knowledge Representing" (Liu et al., CVPRW 2019), rebuilt from its abstract only.

A reconstruction, not the paper's method: no formula, table or code of the paper could be read, so every
technical choice is ours (spec `shared/methods/kr.md`, user notes `docs/methods/kr.md`). Two readings behind
`space`:

- `features` (default): at one aggregated position per stage, a 1x1 conv + BN regressor maps the student's
  stage output to the teacher's (`aggregate: last | mean` of the stage's block outputs); the sparse recoding
  penalty keeps the largest residuals (`penalty: topk`, the top `rho` per sample) or those beyond a dead zone.
- `weights`: the teacher's per-stage distribution of fan-in-scaled conv weights, summarised once, is a prior
  on the student's per-stage weight distribution (1-D Wasserstein or moments); only the top `rho` of the
  prior's per-weight gradients are applied (`deadzone`: the gradients are soft-thresholded instead).

L = ce_weight * CE + kr_weight * L_KR + kd_weight * T^2 * KL. `kr_weight: auto` sets kr_weight = mean(CE) /
mean(L_KR) over the first `calib_batches` training batches and then keeps it (it is saved with checkpoints).
"KR" here is not Knowledge Review (that is `reviewkd`).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from distillab.engine.distributed import all_reduce_
from distillab.errors import ConfigError
from distillab.losses import kd_loss, match_spatial
from distillab.methods.base import Method, MethodOptions, register
from distillab.roles import StageInfo, roles


# ------------------------------------------------------------------------------ sparse recoding penalty
def kept_count(rho: float, n: int) -> int:
    """ceil(rho * n), at least 1 (a tiny tolerance keeps e.g. 0.1 * 30 at 3, not 4)."""
    return min(n, max(1, math.ceil(rho * n - 1e-9)))


def top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """1 at the `keep` largest entries of each row (of the last dim), else 0 (ties: torch.topk's fixed order)."""
    return torch.zeros_like(scores).scatter_(-1, scores.topk(keep, dim=-1, sorted=False).indices, 1.0)


def topk_residual_loss(residual: torch.Tensor, rho: float) -> torch.Tensor:
    """Mean of R^2 over the ceil(rho * C*H*W) largest |R| of each sample (mask from the detached |R|)."""
    flat = residual.flatten(1)
    mask = top_mask(flat.detach().abs(), kept_count(rho, flat.shape[1]))
    return (mask * flat.pow(2)).sum() / mask.sum()


def deadzone_residual_loss(residual: torch.Tensor, target: torch.Tensor, tau_rel: float) -> torch.Tensor:
    """mean(relu(|R| - tau)^2) with tau = tau_rel * RMS of each sample's target: no gradient inside the zone."""
    tau = tau_rel * target.detach().flatten(1).pow(2).mean(1).sqrt()
    tau = tau.view(-1, *[1] * (residual.dim() - 1))
    return F.relu(residual.abs() - tau).pow(2).mean()


def sparse_gradient(grad: torch.Tensor, penalty: str, rho: float, tau_rel: float) -> torch.Tensor:
    """Sparse recoding of a flat gradient: its top ceil(rho * n) entries by magnitude (`topk`), or
    sign(g) * max(|g| - tau, 0) with tau = tau_rel * RMS(g) (`deadzone`)."""
    if penalty == "topk":
        return grad * top_mask(grad.abs(), kept_count(rho, grad.numel()))
    tau = tau_rel * grad.pow(2).mean().sqrt()
    return grad.sign() * F.relu(grad.abs() - tau)


# ------------------------------------------------------------------------------ weight-space prior
def plotting_positions(n: int, like: torch.Tensor) -> torch.Tensor:
    """(m - 0.5) / n for m = 1..n."""
    return (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through (xp, fp), xp increasing, constant beyond the ends (np.interp)."""
    if len(xp) == 1:
        return fp.expand_as(x)
    right = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[right - 1], xp[right], fp[right - 1], fp[right]
    return y0 + ((x - x0) / (x1 - x0)).clamp(0, 1) * (y1 - y0)


def stage_convs(stage: nn.Module, kernels: str) -> list[nn.Conv2d]:
    """The stage's convs (shortcut projections included); `spatial_only` keeps kernels larger than 1x1."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return [c for c in convs if kernels == "all" or c.weight[0, 0].numel() > 1]


def scaled_weights(convs: list[nn.Conv2d], weight_scale: str) -> torch.Tensor:
    """Every conv weight flattened and concatenated, each times sqrt(fan_in) (`fan_in`) or as is (`none`)."""
    scales = [math.sqrt(c.weight[0].numel()) if weight_scale == "fan_in" else 1.0 for c in convs]
    return torch.cat([c.weight.flatten() * scale for c, scale in zip(convs, scales, strict=True)])


def quantile_targets(n: int, teacher_quantiles: torch.Tensor) -> torch.Tensor:
    """Q_t at the n plotting positions of a sorted student sample, Q_t the piecewise-linear quantile function
    through the teacher's values at their own plotting positions."""
    positions = plotting_positions(len(teacher_quantiles), teacher_quantiles)
    return interp(plotting_positions(n, teacher_quantiles), positions, teacher_quantiles)


def quantile_prior(weights: torch.Tensor, targets: torch.Tensor, divergence: str) -> torch.Tensor:
    """mean((sort(w) - q)^2) (`w2`) or mean(|sort(w) - q|) (`w1`), q from `quantile_targets`."""
    gap = weights.sort().values - targets
    return gap.pow(2).mean() if divergence == "w2" else gap.abs().mean()


def moments_prior(weights: torch.Tensor, teacher_moments: torch.Tensor) -> torch.Tensor:
    """(mean_s - mean_t)^2 + (std_s - std_t)^2, population standard deviations."""
    return (weights.mean() - teacher_moments[0]) ** 2 + (weights.std(correction=0) - teacher_moments[1]) ** 2


# ------------------------------------------------------------------------------ stages, from the roles
def stage_shapes_of(method: Method, model: nn.Module) -> list[tuple]:
    """(C, H, W) of every stage output at the method's input shape."""
    return list(method.shapes(model, roles(model).stage_names).values())


def pair_stages(student_shapes: list[tuple], teacher_shapes: list[tuple]) -> list[tuple[int, int]]:
    """Stage pairs (student, teacher): by index when the counts agree, else by equal output resolution
    (the deepest teacher stage of that resolution); unmatched stages are left out."""
    if len(student_shapes) == len(teacher_shapes):
        return [(i, i) for i in range(len(student_shapes))]
    by_resolution = {tuple(shape[1:]): j for j, shape in enumerate(teacher_shapes)}
    return [(i, by_resolution[tuple(s[1:])]) for i, s in enumerate(student_shapes)
            if tuple(s[1:]) in by_resolution]


def block_feature(stage: StageInfo, block: int, feature_point: str) -> str:
    """Tap name of one block's output, or of its pre-activation (the input of its final ReLU) for `preact`;
    blocks that end without a ReLU (pre-activation WRN, linear bottlenecks) give their output for both."""
    preact = stage.block_preacts[block] if feature_point == "preact" else None
    return preact or stage.blocks[block]


# ------------------------------------------------------------------------------ the method
NonNegative = Annotated[float, Field(ge=0)]


class KROptions(MethodOptions):
    renamed: ClassVar[dict[str, str]] = {"kd_T": "temperature"}
    space: Literal["features", "weights"] = "features"
    penalty: Literal["topk", "deadzone"] = "topk"
    rho: float = Field(0.25, gt=0, le=1, description="kept fraction of residuals (features) or prior gradients")
    deadzone_tau_rel: float = Field(0.1, ge=0, description="dead-zone half-width relative to the RMS (placeholder)")
    stages: list[int] | None = Field(None, description="student stage indices; default: all paired stages")
    aggregate: Literal["last", "mean"] = Field("last", description="features: teacher target per stage")
    feature_point: Literal["postact", "preact"] = "postact"
    kernels: Literal["all", "spatial_only"] = Field("all", description="weights: which convs enter the prior")
    weight_scale: Literal["fan_in", "none"] = "fan_in"
    summary: Literal["quantiles", "full", "moments"] = Field("quantiles", description="weights: teacher summary")
    num_quantiles: int = Field(1024, gt=0)
    divergence: Literal["w2", "w1", "moments"] = "w2"
    kr_weight: NonNegative | Literal["auto"] = "auto"
    calib_batches: int = Field(10, gt=0, description="batches that set kr_weight when it is auto")
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(0.0, ge=0, description="logit KD on top (the KR+KD preset: 1.0)")
    temperature: float = Field(4.0, gt=0, description="temperature of the optional KD term")

    @model_validator(mode="after")
    def _summary_fits_divergence(self) -> KROptions:
        if self.summary == "moments" and self.divergence != "moments":
            raise ValueError(f"divergence={self.divergence} needs the teacher's quantile function, but "
                             "summary=moments keeps only its mean and std: set divergence: moments")
        return self


@register("kr")
class KnowledgeRepresenting(Method):
    Options = KROptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        pairs = self._selected_pairs()
        if self.opts.space == "features":
            self._setup_features(pairs)
        else:
            self._setup_weights(pairs)
        fixed = self.opts.kr_weight != "auto"
        self.register_buffer("kr_weight_value", torch.tensor(float(self.opts.kr_weight) if fixed else 0.0))
        # batches seen, sum of CE, sum of L_KR over the calibration batches
        self.register_buffer("calibration", torch.tensor([float(self.opts.calib_batches) if fixed else 0.0, 0, 0]))
        self.register_load_state_dict_post_hook(KnowledgeRepresenting._after_load)

    def _selected_pairs(self) -> list[tuple[int, int]]:
        s_shapes = stage_shapes_of(self, self.student)
        pairs = pair_stages(s_shapes, stage_shapes_of(self, self.teacher))
        if self.opts.stages is not None:
            paired = {i: j for i, j in pairs}
            missing = [i for i in self.opts.stages if i not in paired]
            if missing:
                raise ConfigError(f"method.options.stages: student stages {missing} have no teacher stage of the "
                                  f"same resolution; paired student stages: {sorted(paired)}")
            pairs = [(i, paired[i]) for i in self.opts.stages]
        if not pairs:
            raise ConfigError("kr: no student stage shares an output resolution with a teacher stage")
        return pairs

    # -- reading A: features --------------------------------------------------------------
    def _setup_features(self, pairs: list[tuple[int, int]]) -> None:
        point = self.opts.feature_point
        s_stages, t_stages = roles(self.student).stages, roles(self.teacher).stages
        self.student_names = [block_feature(s_stages[i], -1, point) for i, _ in pairs]
        depths = [len(t_stages[j].blocks) for _, j in pairs]
        blocks = [range(n) if self.opts.aggregate == "mean" else [n - 1] for n in depths]
        self.teacher_groups = [[block_feature(t_stages[j], b, point) for b in stage_blocks]
                               for (_, j), stage_blocks in zip(pairs, blocks, strict=True)]
        s_shapes = self.shapes(self.student, self.student_names)
        t_shapes = self.shapes(self.teacher, [n for group in self.teacher_groups for n in group])
        for group in self.teacher_groups:
            if len({t_shapes[n] for n in group}) > 1:
                raise ConfigError(f"method.options.aggregate=mean: the teacher's blocks {group} differ in shape "
                                  f"({[t_shapes[n] for n in group]}); use aggregate: last")
        self.regressors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s_shapes[s][0], t_shapes[group[0]][0], 1, bias=False),
                          nn.BatchNorm2d(t_shapes[group[0]][0]))
            for s, group in zip(self.student_names, self.teacher_groups, strict=True))
        self.student_tap = self.tap(self.student, self.student_names)
        self.teacher_tap = self.tap(self.teacher, [n for group in self.teacher_groups for n in group])

    def teacher_targets(self) -> list[torch.Tensor]:
        """Per paired stage, the aggregated teacher representation of the last teacher forward pass."""
        return [torch.stack([self.teacher_tap[n] for n in group]).mean(0) if len(group) > 1
                else self.teacher_tap[group[0]] for group in self.teacher_groups]

    def feature_loss(self) -> torch.Tensor:
        """L_KR of the last student and teacher forward passes, summed over the paired stages."""
        total = torch.zeros((), device=self.kr_weight_value.device)
        for regressor, name, target in zip(self.regressors, self.student_names, self.teacher_targets(), strict=True):
            s, t = match_spatial(regressor(self.student_tap[name]).float(), target.float())
            if self.opts.penalty == "topk":
                total = total + topk_residual_loss(s - t, self.opts.rho)
            else:
                total = total + deadzone_residual_loss(s - t, t, self.opts.deadzone_tau_rel)
        self.student_tap.clear()
        self.teacher_tap.clear()
        return total

    # -- reading B: weights ---------------------------------------------------------------
    def _setup_weights(self, pairs: list[tuple[int, int]]) -> None:
        o = self.opts
        self.student_convs: list[list[nn.Conv2d]] = []
        s_stages, t_stages = roles(self.student).stages, roles(self.teacher).stages
        for k, (i, j) in enumerate(pairs):
            convs = stage_convs(self.student.get_submodule(s_stages[i].name), o.kernels)
            teacher_convs = stage_convs(self.teacher.get_submodule(t_stages[j].name), o.kernels)
            if not convs or not teacher_convs:
                raise ConfigError(f"method.options.kernels={o.kernels}: student stage {i} or teacher stage {j} "
                                  "has no such conv; use kernels: all")
            self.student_convs.append(convs)
            with torch.no_grad():
                t = scaled_weights(teacher_convs, o.weight_scale)
            moments = torch.stack([t.double().mean(), t.double().std(correction=0)]).to(t)
            self.register_buffer(f"teacher_moments_{k}", moments)
            if o.summary != "moments":
                t = t.sort().values
                if o.summary == "quantiles":
                    t = quantile_targets(o.num_quantiles, t.double()).to(t)
                self.register_buffer(f"teacher_summary_{k}", t)
        self._set_quantile_targets()

    def _set_quantile_targets(self) -> None:
        """Cache Q_t at the plotting positions of each student stage (fixed sizes), not saved in checkpoints."""
        if self.opts.space != "weights" or self.opts.divergence == "moments":
            return
        for k, convs in enumerate(self.student_convs):
            n = sum(c.weight.numel() for c in convs)
            targets = quantile_targets(n, getattr(self, f"teacher_summary_{k}").double())
            self.register_buffer(f"quantile_targets_{k}", targets.to(convs[0].weight), persistent=False)

    def stage_prior(self, k: int) -> torch.Tensor:
        """The prior divergence of paired stage k, differentiable in the student's raw conv weights."""
        weights = scaled_weights(self.student_convs[k], self.opts.weight_scale)
        if self.opts.divergence == "moments":
            return moments_prior(weights, getattr(self, f"teacher_moments_{k}"))
        return quantile_prior(weights, getattr(self, f"quantile_targets_{k}"), self.opts.divergence)

    def weight_prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(surrogate, L_prior): the surrogate's gradient is the sparse-recoded prior gradient of every stage;
        L_prior is the unmasked prior summed over stages (no graph)."""
        o = self.opts
        surrogate = prior = torch.zeros((), device=self.kr_weight_value.device)
        with torch.enable_grad(), torch.autocast(prior.device.type, enabled=False):
            for k, convs in enumerate(self.student_convs):
                params = [c.weight for c in convs]
                value = self.stage_prior(k)
                grads = torch.autograd.grad(value, params)
                flat = sparse_gradient(torch.cat([g.flatten() for g in grads]), o.penalty, o.rho, o.deadzone_tau_rel)
                for g, w in zip(flat.split([p.numel() for p in params]), params, strict=True):
                    surrogate = surrogate + (g.view_as(w) * w).sum()
                prior = prior + value.detach()
        return surrogate, prior

    def _after_load(self, _keys) -> None:
        self._set_quantile_targets()

    # -- loss weight ----------------------------------------------------------------------
    def kr_weight(self, ce: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
        """The fixed kr_weight, or (auto) sum(CE) / sum(L_KR) over the first `calib_batches` training batches.
        Branch-free (masked updates, no host read of the count), so a compiled step neither syncs nor recompiles
        when calibration ends."""
        if self.training and self.opts.kr_weight == "auto":
            with torch.no_grad():
                sums = torch.stack([ce, kr]).to(self.calibration)
                all_reduce_(sums)  # every rank calibrates on the global batch, so all keep one weight
                calibrating = self.calibration[0] < self.opts.calib_batches
                self.calibration += torch.where(calibrating, torch.cat([sums.new_ones(1), sums]), 0.0)
                _, ce_sum, kr_sum = self.calibration
                weight = torch.where(kr_sum > 0, ce_sum / kr_sum, torch.zeros_like(kr_sum))
                self.kr_weight_value.copy_(torch.where(calibrating, weight, self.kr_weight_value))
        return self.kr_weight_value

    # -- contract -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        o = self.opts
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images) if o.space == "features" or o.kd_weight > 0 else None
        ce = F.cross_entropy(logits, labels)
        if o.space == "features":
            kr = kr_term = self.feature_loss()
        else:
            surrogate, kr = self.weight_prior()
            kr_term = surrogate - surrogate.detach() + kr  # value: L_prior; gradient: the sparse prior gradient
        terms = {"ce": o.ce_weight * ce, "kr": self.kr_weight(ce.detach().float(), kr.detach()) * kr_term}
        if o.kd_weight > 0:
            terms["kd"] = o.kd_weight * kd_loss(logits, teacher_logits, o.temperature)
        return logits, terms
