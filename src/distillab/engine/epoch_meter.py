"""One epoch's running sums (loss terms, logged values, accuracy, time) and the record made from them."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from distillab.engine.distributed import World, all_reduce_sum
from distillab.errors import DistillabError


class NonFiniteLossError(DistillabError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class EpochMeter:
    """Sums kept on the device (no host sync per step); `partial` is what `state()` returned for an epoch
    stopped half-way, so that a resumed epoch's record equals the uninterrupted one's."""

    def __init__(self, device: torch.device, world: World, partial: dict[str, Any] | None = None) -> None:
        partial = partial or {}
        self.device, self.world = device, world
        self.sums: dict[str, torch.Tensor] = {k: v.to(device) for k, v in partial.get("sums", {}).items()}
        self.logs: dict[str, torch.Tensor] = {k: v.to(device) for k, v in partial.get("logs", {}).items()}
        self.correct = torch.tensor(partial.get("correct", 0), dtype=torch.long, device=device)
        self.seen = int(partial.get("seen", 0))
        self.elapsed_before = float(partial.get("elapsed", 0.0))
        self.start = time.perf_counter()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, terms: dict[str, torch.Tensor],
            logs: dict[str, torch.Tensor]) -> None:
        n = len(labels)
        with torch.no_grad():
            for key, value in terms.items():
                self.sums[key] = self.sums.get(key, 0) + value.detach().float() * n
            for key, value in logs.items():
                self.logs[key] = self.logs.get(key, 0) + value.detach().float() * n
            self.correct += (logits.argmax(1) == labels).sum()
        self.seen += n

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def state(self) -> dict[str, Any]:
        """The sums so far, on the CPU (a mid-epoch checkpoint's `partial`)."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()},
                "logs": {k: v.detach().cpu() for k, v in self.logs.items()}, "correct": int(self.correct.item()),
                "seen": self.seen, "elapsed": self.elapsed}

    def means(self, epoch: int, step: int) -> dict[str, float]:
        """Mean loss terms so far over all ranks; a non-finite one stops the run."""
        keys = list(self.sums)
        totals = torch.stack([self.sums[k].detach().double() for k in keys]
                             + [torch.tensor(float(self.seen)).double().to(self.device)])
        totals = all_reduce_sum(totals, self.world).tolist()
        means = {k: v / totals[-1] for k, v in zip(keys, totals[:-1], strict=True)}
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in means.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, by step {step + 1} (terms {terms}); "
                f"the last good checkpoint is kept: lower the learning rate or check the inputs"
            )
        return means

    def record(self, epoch: int, steps: int, lr: float) -> dict[str, Any]:
        """The epoch's record (before evaluation): mean loss terms, train accuracy, logged values, speed."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = self.elapsed
        means = self.means(epoch, steps - 1)
        totals = all_reduce_sum(torch.tensor([float(self.correct.item()), float(self.seen)], dtype=torch.float64,
                                             device=self.device), self.world).tolist()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "loss": sum(means.values())}
        record.update({f"loss_{k}": v for k, v in means.items()})
        record["train_acc"] = 100.0 * totals[0] / totals[1]
        if self.logs:  # what the method logs besides its loss terms, as epoch means
            keys = list(self.logs)
            values = all_reduce_sum(torch.stack([self.logs[k].double() for k in keys]), self.world) / totals[1]
            record.update({f"log_{k}": v for k, v in zip(keys, values.tolist(), strict=True)})
        record["images_per_s"] = totals[1] / elapsed
        record["epoch_time_s"] = elapsed
        return record
