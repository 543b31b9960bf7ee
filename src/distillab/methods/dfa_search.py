"""`dfa_search`: DFA stage 1, the group-wise first-order bi-level search of the aggregation weights (Algorithm 1).

It runs as the first stage of `dfa` with `mode: searched` (`<run>/stages/search/`), through the ordinary Trainer:
atomic checkpoints, exact resume, SIGTERM, the NaN guard, AMP and progress come with it. The training set is
split 50/50 into D_w and D_beta (`train_parts`); each step gets one batch of each:

1. a beta-step on D_beta: Adam on beta_i (the searched group's architecture parameters, softmax -> alpha_i) with
   the bridge loss (Eq. 12) + lambda * ||beta_i||^2, at the current student; the student's BN statistics are left
   as they were;
2. a w-step on D_w: the bridge loss (with the updated, now fixed, beta) is returned to the Trainer, whose
   optimizer (the stage's recipe: SGD at `w_lr`, constant) trains the student and the group's connectors.

Groups are searched one after the other, `epochs_per_group` epochs each (a fresh beta optimizer per group), after
`warmup_epochs` of plain CE on D_w. Per step it logs each path's gradient on beta_i and alpha_i (`log_g<i>_...`
in metrics.jsonl), and at the end writes aggregation.json and its heat-map.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from distillab.engine.distributed import all_reduce_
from distillab.errors import ConfigError
from distillab.methods.base import Method, register
from distillab.methods.capabilities import BilevelSearch, missing_input
from distillab.methods.dfa import DFASearchOptions, aggregate, groups_by_roles, teacher_groups


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


@register("dfa_search")
class DFASearch(BilevelSearch, Method):
    Options = DFASearchOptions

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        self.groups = groups_by_roles(teacher, student, self.input_shape)
        if not callable(getattr(student, "forward_from", None)):
            raise ConfigError(f"dfa's search continues the student from a bridged teacher map at each stage "
                              f"(`forward_from(stage, map)`, which zoo models have): {type(student).__name__} has "
                              "none. Set method.options.mode to last, average or random, or give searched weights")
        self.student_tap = self.tap(student, self.groups.student_stages)
        self.teacher_tap = self.tap(teacher, [n for names in self.groups.names for n in names])
        # beta is trained by the method's own Adam on the beta-step: kept out of the Trainer's optimizer
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(n), requires_grad=False) for n in self.groups.sizes)
        pairs = list(zip(self.groups.teacher_channels, self.groups.student_channels, strict=True))
        self.ts = nn.ModuleList(nn.Conv2d(ct, cs, 1) for ct, cs in pairs)  # TS_i: teacher -> student width
        self.st = nn.ModuleList(nn.Conv2d(cs, ct, 1) for ct, cs in pairs)  # ST_i: student -> teacher width
        self.group: int | None = None
        self._beta_optimizer: torch.optim.Optimizer | None = None
        self._logs: dict[str, torch.Tensor] = {}

    # -- the schedule -------------------------------------------------------------------------------
    @property
    def fixed_epochs(self) -> int:
        return self.opts.warmup_epochs + len(self.groups.sizes) * self.opts.epochs_per_group

    def group_of(self, epoch: int) -> int | None:
        """The group searched in `epoch` (0-based), None during the warm-up."""
        if epoch < self.opts.warmup_epochs:
            return None
        return min((epoch - self.opts.warmup_epochs) // self.opts.epochs_per_group, len(self.groups.sizes) - 1)

    def start_group(self, group: int) -> None:
        o = self.opts
        self.group = group
        self._beta_optimizer = torch.optim.Adam([self.betas[group]], lr=o.beta_lr, betas=o.beta_betas)

    def train_parts(self, n_train: int) -> list[torch.Tensor]:
        return list(split_halves(n_train, self.opts.split_seed))

    def alphas(self) -> list[torch.Tensor]:
        """Eq. 6: softmax of each group's beta."""
        return [beta.softmax(0) for beta in self.betas]

    # -- the bridge loss ----------------------------------------------------------------------------
    def bridge_terms(self, group: int, images: torch.Tensor, labels: torch.Tensor, beta: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Eq. 12 for group i at architecture parameters `beta`, weighted: ts = ts_weight * L_TS (Eq. 10),
        st = st_weight * L_ST (Eq. 11); and the student's own logits (the forward that gives its map at the group's
        end: each BN sees the bridged teacher map, then the images, as when the map is continued by hand)."""
        target = aggregate(teacher_groups(self.teacher, self.teacher_tap, self.groups.names, images)[group],
                           beta.softmax(0))
        ts_logits = self.student.forward_from(group + 1, self.ts[group](target))
        logits = self.student(images)
        student_map = self.student_tap.take()[group]
        return {"ts": self.opts.ts_weight * F.cross_entropy(ts_logits, labels),
                "st": self.opts.st_weight * unit_distance(self.st[group](student_map), target)}, logits

    def beta_step(self, group: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One Adam step on beta_i with the bridge loss + lambda ||beta_i||^2 at the current w (first order); the
        student's BN statistics are kept. Logs each path's gradient and alpha_i."""
        beta = self.betas[group].detach().requires_grad_()
        with buffers_kept(self.student), torch.enable_grad():
            terms, _ = self.bridge_terms(group, images, labels, beta)
            grad_ts, = torch.autograd.grad(terms["ts"], beta, retain_graph=True)
            grad_st, = torch.autograd.grad(terms["st"], beta)
        grad = grad_ts + grad_st + 2 * self.opts.beta_l2 * beta.detach()
        all_reduce_(grad, mean=True)  # every rank steps beta alike
        self.betas[group].grad = grad
        self._beta_optimizer.step()
        self.betas[group].grad = None
        for j, (g_ts, g_st, a) in enumerate(zip(grad_ts, grad_st, self.betas[group].softmax(0), strict=True)):
            self._logs.update({f"g{group}_ts_grad_{j}": g_ts, f"g{group}_st_grad_{j}": g_st, f"g{group}_alpha_{j}": a})

    def forward(self, images: torch.Tensor, labels: torch.Tensor, images_beta: torch.Tensor | None = None,
                labels_beta: torch.Tensor | None = None):
        if images_beta is None or labels_beta is None:
            raise missing_input(self.name, "a batch from each of the two parts of train_parts(n_train) per step",
                                "method(images, labels, images_beta, labels_beta)",
                                "it is dfa's search stage, meant for `distillab train` with method dfa")
        group = self.group_of(self.epoch)
        if group is None:  # the warm-up: CE on D_w
            logits = self.student(images)
            return logits, {"ce": F.cross_entropy(logits, labels)}
        if group != self.group:
            self.start_group(group)
        if self.training:
            self.beta_step(group, images_beta, labels_beta)
        terms, logits = self.bridge_terms(group, images, labels, self.betas[group].detach())
        if self.opts.add_student_ce:
            terms["ce"] = F.cross_entropy(logits, labels)
        return logits, terms

    def take_logs(self) -> dict[str, torch.Tensor]:
        logs, self._logs = self._logs, {}
        return logs

    # -- state and outputs --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        if self.group is None:
            return {}
        return {"group": self.group, "beta_optimizer": self._beta_optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.start_group(int(state["group"]))
            self._beta_optimizer.load_state_dict(state["beta_optimizer"])

    def write_outputs(self, run_dir: Path) -> dict[str, Any]:
        """aggregation.json (each group's candidate names, beta and weights) and its heat-map."""
        from distillab.methods.dfa_report import (
            DYNAMICS_FILE,
            HEATMAP_FILE,
            plot_aggregation,
            plot_search_dynamics,
            write_aggregation,
        )

        groups = [{"names": names, "beta": beta.detach().cpu().tolist(), "weights": alpha.detach().cpu().tolist()}
                  for names, beta, alpha in zip(self.groups.names, self.betas, self.alphas(), strict=True)]
        write_aggregation(run_dir, {"method": "dfa", "stage": "search", "search_options": self.opts.model_dump(
            mode="json"), "groups": groups})
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        pair = f"{(cfg.get('teacher') or {}).get('name')} -> {(cfg.get('student') or {}).get('name')}"
        plot_aggregation(run_dir / HEATMAP_FILE, [g["weights"] for g in groups],
                         f"DFA weights: {pair} on {(cfg.get('data') or {}).get('name')}")
        plot_search_dynamics(run_dir, run_dir / DYNAMICS_FILE)
        return {"aggregation": [g["weights"] for g in groups]}
