"""`diffkd`: Huang et al., "Knowledge Diffusion for Distillation" (NeurIPS 2023).

The student feature is treated as a noisy teacher feature. A light ε-prediction diffusion model, trained
on teacher latents only (L_diff), denoises the projected student feature in a few deterministic DDIM steps
(t = 400, 300, 200, 100, 0, with gradients through every step); the KD distance is taken between the
denoised student and the teacher. Adaptive noise matching blends the student feature with Gaussian noise
by a learned per-sample γ first; an optional linear autoencoder (feature branch only) gives a smaller
latent. One branch runs on the pre-pool feature map (MSE), one on the logits as B×K×1×1 maps (KL, τ = 1):

    L = ce·CE(raw logits) + kd·(D_feat + D_logit) + diff·(L_diff_feat + L_diff_logit) + ae·L_ae

Each branch can be switched off; the distances are `mse`, `kl` or `dist` (logit_distance=dist is DiffKD†).
If the two maps differ in size, the larger is average-pooled to the smaller after `trans`.
All branch modules are side modules of the method: the deployed student is the plain student.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from distillab.errors import ConfigError
from distillab.losses import dist_loss, kd_loss, match_spatial
from distillab.methods.base import Method, MethodOptions, register
from distillab.roles import roles

BranchKind = Literal["feature", "logits"]
Distance = Literal["mse", "kl", "dist"]
TIME_EMBEDDINGS = 1280  # rows of the time-embedding table (official code)


# -- the DDIM scheduler ---------------------------------------------------------------------------
def linear_alphas_cumprod(train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t} (1 − β_s) for β linear from `beta_start` to `beta_end` (float64)."""
    betas = torch.linspace(beta_start, beta_end, train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def denoising_timesteps(inference_steps: int, train_timesteps: int) -> list[int]:
    """The second half of the 2n evenly spaced DDIM timesteps: [400, 300, 200, 100, 0] for n = 5, T = 1000."""
    ratio = train_timesteps // (2 * inference_steps)
    return [i * ratio for i in reversed(range(inference_steps))]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float) -> torch.Tensor:
    """One deterministic DDIM step (η = 0, no clipping): predict x0, then re-noise it to ᾱ_prev."""
    x0 = (x - (1.0 - abar_t) ** 0.5 * eps) / abar_t**0.5
    return abar_prev**0.5 * x0 + (1.0 - abar_prev) ** 0.5 * eps


# -- modules ------------------------------------------------------------------------------------
def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1) -> list[nn.Module]:
    """A biased conv (every DiffKD conv has a bias) followed by BN."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(out_channels)]


class ResidualBottleneck(nn.Module):
    """1×1 (C→C/r), BN, ReLU, 3×3, BN, ReLU, 1×1 (C/r→C), BN, plus the input; no ReLU after the add."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        mid = channels // reduction
        self.body = nn.Sequential(*conv_bn(channels, mid), nn.ReLU(), *conv_bn(mid, mid, 3), nn.ReLU(),
                                  *conv_bn(mid, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class NoisePredictor(nn.Module):
    """Φθ(x, t): a learned time embedding added to the input, then a light ε-prediction network."""

    def __init__(self, channels: int, kind: BranchKind) -> None:
        super().__init__()
        self.time_embedding = nn.Embedding(TIME_EMBEDDINGS, channels)
        if kind == "feature":
            self.body = nn.Sequential(ResidualBottleneck(channels, 4), ResidualBottleneck(channels, 4),
                                      *conv_bn(channels, channels))
        else:
            wide = 4 * channels
            self.body = nn.Sequential(*conv_bn(channels, wide), nn.ReLU(), *conv_bn(wide, channels),
                                      *conv_bn(channels, wide), nn.ReLU(), nn.Conv2d(wide, channels, 1))

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """`t`: one timestep for the whole batch, or a (B,) tensor of timesteps."""
        t = torch.as_tensor(t, device=x.device)
        return self.body(x + self.time_embedding(t).view(-1, x.shape[1], 1, 1))


class NoiseAdapter(nn.Module):
    """Adaptive noise matching: γ ∈ (0, 1) per sample, column 0 of a softmax over a 2-way linear head."""

    def __init__(self, channels: int, kind: BranchKind) -> None:
        super().__init__()
        if kind == "feature":
            self.features = nn.Sequential(ResidualBottleneck(channels, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        else:
            self.features = nn.Sequential(*conv_bn(channels, 2 * channels), nn.ReLU(),
                                          *conv_bn(2 * channels, channels), nn.Flatten(1))
        self.head = nn.Linear(channels, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z)).softmax(dim=1)[:, 0]


class LinearAutoencoder(nn.Module):
    """Teacher latent: encoder Conv1×1 + BN, decoder Conv1×1 (no BN)."""

    def __init__(self, teacher_channels: int, latent_channels: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*conv_bn(teacher_channels, latent_channels))
        self.decoder = nn.Conv2d(latent_channels, teacher_channels, 1)


def blend_with_noise(z: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """γ·z + (1 − γ)·noise, γ per sample (larger γ, less noise)."""
    gamma = gamma.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    return gamma * z + (1.0 - gamma) * noise


class BranchOutput(NamedTuple):
    denoised: torch.Tensor  # proj(DDIM chain(γ-blended trans(F_s))), B×C×H×W
    target: torch.Tensor  # the teacher latent Z_t (detached), B×C×H×W
    diff_loss: torch.Tensor  # L_diff on the teacher latent
    ae_loss: torch.Tensor | None  # L_ae, None without the autoencoder
    gamma: torch.Tensor | None  # (B,) noise-matching weights, None without the adapter


class DiffusionBranch(nn.Module):
    """One DiffKD instance: student projection, optional AE, noise adapter, Φθ, DDIM chain, output projection.

    Working width C = `ae_channels` when given (feature branch only), else the teacher's channels.
    """

    def __init__(self, student_channels: int, teacher_channels: int, kind: BranchKind,
                 ae_channels: int | None = None, inference_steps: int = 5, train_timesteps: int = 1000,
                 noise_adapter: bool = True) -> None:
        super().__init__()
        if ae_channels is not None and kind != "feature":
            raise ValueError("the autoencoder is for the feature branch only")
        channels = ae_channels or teacher_channels
        self.trans = nn.Conv2d(student_channels, channels, 1)
        self.ae = LinearAutoencoder(teacher_channels, channels) if ae_channels else None
        self.noise_adapter = NoiseAdapter(channels, kind) if noise_adapter else None
        self.phi = NoisePredictor(channels, kind)
        self.proj = nn.Sequential(*conv_bn(channels, channels))
        abar = linear_alphas_cumprod(train_timesteps)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        steps = denoising_timesteps(inference_steps, train_timesteps)
        ratio = train_timesteps // (2 * inference_steps)
        # (t, ᾱ_t, ᾱ_prev); the final step uses ᾱ_prev = 1 ("set alpha to one")
        self.schedule = [(t, abar[t].item(), abar[t - ratio].item() if t >= ratio else 1.0) for t in steps]

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """The DDIM chain, with gradients through every call of Φθ."""
        for t, abar_t, abar_prev in self.schedule:
            x = ddim_step(x, self.phi(x, t), abar_t, abar_prev)
        return x

    def diffusion_loss(self, z_t: torch.Tensor) -> torch.Tensor:
        """ε-prediction loss: an independent t ∈ [0, T) per sample, fresh noise, MSE to the noise."""
        t = torch.randint(0, len(self.alphas_cumprod), (z_t.shape[0],), device=z_t.device)
        noise = torch.randn_like(z_t)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(z_t.dtype)
        noisy = abar.sqrt() * z_t + (1.0 - abar).sqrt() * noise
        return F.mse_loss(self.phi(noisy, t).float(), noise.float())

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> BranchOutput:
        z_s = self.trans(f_s)
        ae_loss = None
        if self.ae is not None:
            latent = self.ae.encoder(f_t)
            ae_loss = F.mse_loss(self.ae.decoder(latent).float(), f_t.float())
            z_t = latent.detach()
        else:
            z_t = f_t.detach()
        z_s, z_t = match_spatial(z_s, z_t)
        gamma = None
        if self.noise_adapter is not None:
            gamma = self.noise_adapter(z_s)
            z_s = blend_with_noise(z_s, gamma, torch.randn_like(z_s))
        denoised = self.proj(self.denoise(z_s))
        return BranchOutput(denoised, z_t, self.diffusion_loss(z_t), ae_loss, gamma)


# -- distances ------------------------------------------------------------------------------------
def as_rows(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → (B·H·W)×C: channels are the classes, every position a sample."""
    return x.float().movedim(1, -1).reshape(-1, x.shape[1])


def distance(name: Distance, denoised: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KD distance between the denoised student and the teacher latent (target detached)."""
    if name == "mse":
        return F.mse_loss(denoised.float(), target.float())
    rows_s, rows_t = as_rows(denoised), as_rows(target.detach())
    if name == "kl":
        return kd_loss(rows_s, rows_t, temperature)
    return dist_loss(rows_s, rows_t, temperature)  # β = γ = 1


# -- the method -----------------------------------------------------------------------------------
class DiffKDOptions(MethodOptions):
    feature: bool = Field(True, description="distil the pre-pool feature map through a diffusion branch")
    logits: bool = Field(True, description="distil the logits (as B×K×1×1 maps) through a diffusion branch")
    student_layer: str | None = Field(None, description="feature tap name; default: the student's pre-pool map")
    teacher_layer: str | None = Field(None, description="feature tap name; default: the teacher's pre-pool map")
    ae_channels: int | None = Field(None, gt=0, description="latent width of the feature branch's linear AE; "
                                    "null = no AE (CIFAR); 1024 for ImageNet CNN teachers")
    noise_adapter: bool = Field(True, description="adaptive noise matching (per-sample γ blend)")
    inference_steps: int = Field(5, ge=1, description="DDIM denoising steps (t = 400, 300, 200, 100, 0 for 5)")
    train_timesteps: int = Field(1000, ge=2, le=TIME_EMBEDDINGS, description="diffusion steps T of the schedule")
    feature_distance: Distance = "mse"
    logit_distance: Distance = Field("kl", description="kl; dist gives DiffKD†")
    temperature: float = Field(1.0, gt=0, description="τ of the kl and dist distances")
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0, description="λ3, on each branch's KD distance")
    diff_weight: float = Field(1.0, ge=0, description="λ1, on each branch's diffusion loss")
    ae_weight: float = Field(1.0, ge=0, description="λ2, on the AE reconstruction loss")
    plain_kd_weight: float = Field(0.0, ge=0, description="weight of a standard KD term on the raw logits (T^2 KL "
                                   "at plain_kd_temperature): not in the paper; with logits: false it gives the "
                                   "feature branch + standard KD control")
    plain_kd_temperature: float = Field(4.0, gt=0, description="T of the plain_kd term")

    @model_validator(mode="after")
    def _something_to_distil(self) -> DiffKDOptions:
        if not (self.feature or self.logits):
            raise ValueError("feature and logits are both off: switch on at least one branch")
        if 2 * self.inference_steps > self.train_timesteps:
            raise ValueError(f"inference_steps={self.inference_steps} needs train_timesteps >= "
                             f"{2 * self.inference_steps}")
        return self


@register("diffkd")
class DiffKD(Method):
    Options = DiffKDOptions
    caches_teacher = True

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        o = self.opts
        branch = {"inference_steps": o.inference_steps, "train_timesteps": o.train_timesteps,
                  "noise_adapter": o.noise_adapter}
        self.feature_branch = self.logit_branch = None
        if o.logits:
            # the empty name is the model itself: its output, the logits
            ks, kt = self.shapes(student, [""])[""][0], self.shapes(teacher, [""])[""][0]
            if ks != kt:
                raise ConfigError(f"the logits branch needs as many student outputs as teacher outputs ({ks} vs {kt})")
            self.logit_branch = DiffusionBranch(ks, kt, "logits", **branch)
        if o.feature:
            s_name = o.student_layer or roles(student, "student_layer").prepool
            t_name = o.teacher_layer or roles(teacher, "teacher_layer").prepool
            cs, ct = self.shapes(student, [s_name])[s_name][0], self.shapes(teacher, [t_name])[t_name][0]
            self.feature_branch = DiffusionBranch(cs, ct, "feature", ae_channels=o.ae_channels, **branch)
            self.student_tap = self.tap(student, [s_name])
            self.teacher_tap = self.tap(teacher, [t_name])

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        o = self.opts
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        terms = {"ce": o.ce_weight * F.cross_entropy(logits, labels)}
        if self.feature_branch is not None:
            (f_s,), (f_t,) = self.student_tap.take(), self.teacher_tap.take()
            out = self.feature_branch(f_s, f_t)
            terms["kd_feature"] = o.kd_weight * distance(o.feature_distance, out.denoised, out.target, o.temperature)
            terms["diff_feature"] = o.diff_weight * out.diff_loss
            if out.ae_loss is not None:
                terms["ae"] = o.ae_weight * out.ae_loss
        if self.logit_branch is not None:
            out = self.logit_branch(logits[..., None, None], teacher_logits[..., None, None])
            terms["kd_logits"] = o.kd_weight * distance(o.logit_distance, out.denoised, out.target, o.temperature)
            terms["diff_logits"] = o.diff_weight * out.diff_loss
        if o.plain_kd_weight:
            terms["kd"] = o.plain_kd_weight * kd_loss(logits, teacher_logits, o.plain_kd_temperature)
        return logits, terms
