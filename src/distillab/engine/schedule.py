"""Learning-rate schedules as pure functions of training progress (nothing to checkpoint)."""

from __future__ import annotations

import math

from distillab.config import ScheduleConfig, step_milestones


def learning_rate(cfg: ScheduleConfig, base_lr: float, epoch: int, step: int, steps_per_epoch: int,
                  num_epochs: int) -> float:
    """LR for `step` (0-based) of `epoch` (0-based).

    step:   base * gamma^#(epoch_1based > m) for each milestone m (the CIFAR protocol's rule)
    cosine: min_lr + (base - min_lr) * (1 + cos(pi * progress)) / 2, progress over the whole run
    A linear warm-up over `warmup_epochs` multiplies either.
    """
    progress = epoch + step / steps_per_epoch  # epochs done, fractional
    if cfg.name == "step":
        lr = base_lr * cfg.gamma ** sum(epoch + 1 > m for m in step_milestones(cfg, num_epochs))
    elif cfg.name == "cosine":
        lr = cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress / num_epochs))
    else:
        lr = base_lr
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        lr *= (progress + 1 / steps_per_epoch) / cfg.warmup_epochs
    return lr
