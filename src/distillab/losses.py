"""The losses the methods compute, as pure functions of tensors: one place, each pinned by a hand-derived test.

Methods import from here; a method module re-exports the ones it is known by (`distillab.methods.kd.kd_loss`).
Conventions: logits are B x C and computed in float32; a temperature T multiplies a softened KL by T^2; the
returned value is unweighted unless the function takes the weights (`dkd_loss`, `dist_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# -------------------------------------------------------------------------------------------------------- logits
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(p_t || p_s), with p = softmax(logits / T)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


_MASK_LOGIT = 1000.0  # subtracted from the target logit (after / T) to drop it from the non-target softmax


def _binary_kl(p_teacher: torch.Tensor, p_student: torch.Tensor) -> torch.Tensor:
    """Per-sample KL([p_t, 1 - p_t] || [p_s, 1 - p_s]) from the target probabilities."""
    teacher = torch.stack([p_teacher, 1 - p_teacher], dim=1)
    student = torch.stack([p_student, 1 - p_student], dim=1)
    return F.kl_div(torch.log(student), teacher, reduction="none").sum(dim=1)


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T^2 * mean over the batch of its KL, unweighted."""
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    target = F.one_hot(labels, z_s.shape[1]).bool()
    index = labels[:, None]  # gathered rather than masked: no data-dependent shape, so no graph break
    p_s_target = F.softmax(z_s, dim=1).gather(1, index).squeeze(1)
    p_t_target = F.softmax(z_t, dim=1).gather(1, index).squeeze(1)
    tckd = _binary_kl(p_t_target, p_s_target).mean()
    log_q_s = F.log_softmax(z_s - _MASK_LOGIT * target, dim=1)
    log_q_t = F.log_softmax(z_t - _MASK_LOGIT * target, dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (no warm-up: callers scale it)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


def warmup_factor(epoch: int | torch.Tensor, warmup: int) -> float | torch.Tensor:
    """mdistiller's min(epoch / warmup, 1) with epochs counted from 1; `epoch` here is 0-based. Given the epoch
    as a tensor (a method's `epoch_tensor`), the factor is a tensor: a compiled step does not recompile when the
    epoch changes."""
    if warmup <= 0:
        return 1.0
    if isinstance(epoch, torch.Tensor):
        return ((epoch + 1) / warmup).clamp(max=1.0)
    return min((epoch + 1) / warmup, 1.0)


_PEARSON_EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of two B x C matrices."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _PEARSON_EPS)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra), each already multiplied by tau^2."""
    y_s = F.softmax(student_logits.float() / tau, dim=1)
    y_t = F.softmax(teacher_logits.float() / tau, dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return tau**2 * inter, tau**2 * intra


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0,
              beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """L_DIST = tau^2 * (beta * inter + gamma * intra)."""
    inter, intra = dist_terms(student_logits, teacher_logits, tau)
    return beta * inter + gamma * intra


MLKD_TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def class_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                           ) -> torch.Tensor:
    """||P_t^T P_t - P_s^T P_s||^2 / C, P = softmax(logits / T) (B x C)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / p_s.shape[1]


def batch_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                           ) -> torch.Tensor:
    """||P_t P_t^T - P_s P_s^T||^2 / B, P = softmax(logits / T) (B x C)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / p_s.shape[0]


def at_most_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of `values` at most their median (numpy's linear-interpolation percentile 50), on the device."""
    return (values <= torch.quantile(values.float(), 0.5)).float().mean()


def mlkd_terms(weak_s: torch.Tensor, weak_t: torch.Tensor, strong_s: torch.Tensor, strong_t: torch.Tensor,
               temperatures: tuple[float, ...] = MLKD_TEMPERATURES, quirk: bool = True) -> dict[str, torch.Tensor]:
    """The unweighted kd (weak + strong), cc and bc terms of MLKD from the four logit tensors (B x C)."""
    p_t = F.softmax(weak_t.detach().float(), dim=1)
    sample_scale = at_most_median(p_t.max(dim=1).values)
    class_scale = at_most_median(p_t.sum(dim=0))
    kd_weak = sum(kd_loss(weak_s, weak_t, t) for t in temperatures)
    kd_strong = sum(kd_loss(weak_s, weak_t, t) if quirk and t in (2.0, 6.0) else kd_loss(strong_s, strong_t, t)
                    for t in temperatures)
    return {
        "kd": sample_scale * kd_weak + kd_strong,
        "cc": class_scale * sum(class_correlation_loss(weak_s, weak_t, t) for t in temperatures),
        "bc": sample_scale * sum(batch_correlation_loss(weak_s, weak_t, t) for t in temperatures),
    }


# -------------------------------------------------------------------------------------------------- feature maps
def match_spatial(z_s: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger map (per axis) to the smaller one's height and width."""
    size = (min(z_s.shape[-2], z_t.shape[-2]), min(z_s.shape[-1], z_t.shape[-1]))
    return tuple(z if z.shape[-2:] == size else F.adaptive_avg_pool2d(z, size) for z in (z_s, z_t))


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """B x (H*W): the channel mean of F^p, flattened and L2-normalised per sample."""
    return F.normalize(feature.float().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the attention maps, the larger map pooled to the smaller size."""
    if f_s.shape[-2:] != f_t.shape[-2:]:
        size = min(f_s.shape[-2:], f_t.shape[-2:], key=lambda hw: hw[0] * hw[1])
        f_s, f_t = F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


_POOL_SIZES = (4, 2, 1)


def hcl_level(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """HCL of one level: weighted mean of the MSE at full size and at the pooled sizes smaller than the map."""
    loss, weight, total = F.mse_loss(f_s, f_t), 1.0, 1.0
    for size in _POOL_SIZES:
        if size >= f_s.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
        total += weight
    return loss / total


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    return sum(hcl_level(f_s.float(), f_t.float()) for f_s, f_t in zip(student, teacher, strict=True))


# ------------------------------------------------------------------------------------ distributions and contrast
def gaussian_kl(
    mean_p: torch.Tensor, log_var_p: torch.Tensor, mean_q: torch.Tensor, log_var_q: torch.Tensor
) -> torch.Tensor:
    """KL(N_p || N_q) between diagonal Gaussians given by (mean, log-variance), summed over the dimensions and
    averaged over the batch."""
    mean_p, log_var_p, mean_q, log_var_q = (t.float() for t in (mean_p, log_var_p, mean_q, log_var_q))
    ratio = torch.exp(log_var_p - log_var_q) + (mean_p - mean_q) ** 2 * torch.exp(-log_var_q)
    return 0.5 * (log_var_q - log_var_p + ratio - 1).sum(dim=1).mean()


_NCE_EPS = 1e-7


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """NCE with noise P_n = 1/N on B x (1 + K) probabilities P (column 0 the positive):
    -(1/B) * sum_b [log(P_pos / (P_pos + K P_n + eps)) + sum_neg log(K P_n / (P_neg + K P_n + eps))]."""
    k = scores.shape[1] - 1
    noise = k / num_data
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + _NCE_EPS))
    negative = torch.log(noise / (scores[:, 1:] + noise + _NCE_EPS))
    return -(positive.sum() + negative.sum()) / scores.shape[0]
