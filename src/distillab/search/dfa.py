"""DFA stage 1: the group-wise, first-order bi-level search of the aggregation weights (Algorithm 1).

The architecture parameters beta_i (one vector per group, softmax -> alpha_i) are trained on D_beta with the bridge
loss (Eq. 12) plus lambda * ||beta_i||^2; the student and the connectors TS_i / ST_i are trained on D_w with the
bridge loss; one beta-step and one w-step alternate. Groups are searched one after the other; the other groups'
beta stay fixed. The teacher is frozen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from distillab.config import AugmentConfig
from distillab.data import DeviceLoader, ImageDataset
from distillab.data.loader import derive_seed
from distillab.errors import ConfigError
from distillab.methods.dfa import DFASearchOptions, aggregate, block_outputs, match_groups, teacher_groups


def split_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, seeded halves of range(n): (D_w, D_beta) indices, each sorted (D_beta gets the odd one out)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2].sort().values, perm[n // 2 :].sort().values


def unit_distance(student_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 11: batch mean of ||s_b / ||s_b|| - a_b / ||a_b|| ||^2 over each sample's C*H*W values (= 2 - 2 cos)."""
    s = F.normalize(student_map.flatten(1).float(), dim=1)
    a = F.normalize(target.flatten(1).float(), dim=1)
    return (s - a).pow(2).sum(1).mean()


@contextlib.contextmanager
def buffers_kept(module: nn.Module):
    """Restore the module's buffers (BN running statistics) on exit: a beta-step trains nothing but beta."""
    saved = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved, strict=True):
                buffer.copy_(value)


class BridgeSearch(nn.Module):
    """The search state: beta per group, the TS / ST connectors per group, the student and the frozen teacher.

    Call `start_group(i)` (fresh optimizers for group i), then alternate `beta_step` and `w_step`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, opts: DFASearchOptions,
                 input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.opts = opts
        self.groups = match_groups(teacher, student, input_shape)
        self.student, self.teacher = student, teacher
        teacher.eval()
        teacher.requires_grad_(False)
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in self.groups.sizes)
        pairs = list(zip(self.groups.teacher_channels, self.groups.student_channels, strict=True))
        self.ts = nn.ModuleList(nn.Conv2d(ct, cs, 1) for ct, cs in pairs)  # TS_i: teacher -> student width
        self.st = nn.ModuleList(nn.Conv2d(cs, ct, 1) for ct, cs in pairs)  # ST_i: student -> teacher width
        self.group = 0
        self._beta_optimizer: torch.optim.Optimizer | None = None
        self._w_optimizer: torch.optim.Optimizer | None = None

    def train(self, mode: bool = True) -> BridgeSearch:
        super().train(mode)
        self.teacher.eval()
        return self

    def alphas(self) -> list[torch.Tensor]:
        """Eq. 6: softmax of each group's beta."""
        return [beta.softmax(0) for beta in self.betas]

    def w_parameters(self, group: int) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.ts[group].parameters(), *self.st[group].parameters()]

    def start_group(self, group: int) -> None:
        o = self.opts
        self.group = group
        self._beta_optimizer = torch.optim.Adam([self.betas[group]], lr=o.beta_lr, betas=o.beta_betas)
        self._w_optimizer = torch.optim.SGD(self.w_parameters(group), lr=o.w_lr, momentum=o.w_momentum,
                                            weight_decay=o.w_weight_decay)

    def bridge_terms(self, group: int, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 12 for group i, weighted: ts = gamma_ts * L_TS (Eq. 10), st = gamma_st * L_ST (Eq. 11)."""
        target = aggregate(teacher_groups(self.teacher, self.groups, images, group)[group],
                           self.betas[group].softmax(0))
        ts_logits = self.student.forward_from(group + 1, self.ts[group](target))
        _, student_map = block_outputs(self.student, images, group)
        terms = {"ts": self.opts.gamma_ts * F.cross_entropy(ts_logits, labels),
                 "st": self.opts.gamma_st * unit_distance(self.st[group](student_map), target)}
        if self.opts.add_student_ce:
            terms["ce"] = F.cross_entropy(self.student.forward_from(group + 1, student_map), labels)
        return terms

    def beta_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Adam step on beta_i with the bridge loss + lambda ||beta_i||^2 at the current w (first order; a
        second-order variant would replace this method). The student's BN statistics are left as they were."""
        beta = self.betas[self.group]
        with buffers_kept(self.student):
            terms = self.bridge_terms(self.group, images, labels)
            loss = sum(terms.values()) + self.opts.beta_l2 * beta.pow(2).sum()
            self._beta_optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=[beta])
        self._beta_optimizer.step()
        return terms

    def w_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step on the student and the group's connectors with the bridge loss; beta is untouched."""
        terms = self.bridge_terms(self.group, images, labels)
        params = self.w_parameters(self.group)
        self._w_optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward(inputs=params)
        self._w_optimizer.step()
        return terms


@dataclass
class GroupResult:
    names: list[str]
    beta: list[float]
    weights: list[float]
    steps: int
    beta_step_terms: dict[str, float]  # mean weighted bridge terms on D_beta over the group's last pass


def endless(loader: DeviceLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_search(searcher: BridgeSearch, train: ImageDataset, *, batch_size: int, seed: int,
               device: torch.device | str = "cpu", augment: AugmentConfig | None = None,
               console: Console | None = None, progress: bool = True) -> list[GroupResult]:
    """Algorithm 1 on `train`, split 50/50 into D_w and D_beta: every group in order, I_s steps each."""
    opts = searcher.opts
    halves = split_halves(len(train), opts.split_seed)
    if batch_size > len(halves[0]):
        raise ConfigError(f"train.batch_size={batch_size} exceeds the {len(halves[0])} images of each half of the "
                          f"search split ({len(train)} training images)")
    loaders = [DeviceLoader(train.subset(idx), batch_size, device=device, shuffle=True, augment=augment,
                            drop_last=True, seed=derive_seed("dfa-search", half, seed))
               for half, idx in zip(("w", "beta"), halves, strict=True)]
    w_batches, beta_batches = (endless(loader) for loader in loaders)
    steps = max(1, math.ceil(opts.epochs_per_group * len(loaders[0])))
    window = min(steps, len(loaders[1]))
    searcher.to(device).train()
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(), disable=not progress) as bar:
        for group, names in enumerate(searcher.groups.names):
            task = bar.add_task(f"group {group + 1}/{len(searcher.groups.names)}", total=steps, info="")
            searcher.start_group(group)
            recent: list[dict[str, torch.Tensor]] = []
            for step in range(steps):
                recent.append({k: v.detach() for k, v in searcher.beta_step(*next(beta_batches)).items()})
                searcher.w_step(*next(w_batches))
                recent = recent[-window:]
                if (step + 1) % max(1, steps // 50) == 0 or step + 1 == steps:
                    alpha = " ".join(f"{a:.2f}" for a in searcher.betas[group].softmax(0).tolist())
                    bar.update(task, completed=step + 1, info=f"alpha [{alpha}]")
            means = {k: float(torch.stack([r[k] for r in recent]).mean()) for k in recent[0]}
            beta = searcher.betas[group].detach().cpu()
            results.append(GroupResult(names, beta.tolist(), beta.softmax(0).tolist(), steps, means))
            bar.console.print(f"group {group + 1}/{len(searcher.groups.names)}: alpha "
                              f"[{' '.join(f'{a:.3f}' for a in results[-1].weights)}]; on D_beta "
                              + " ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return results

