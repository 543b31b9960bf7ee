"""The one training loop every method runs in."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import distillab
from distillab.config import AugmentConfig, TrainConfig
from distillab.data import DataSplits, DeviceLoader
from distillab.engine.checkpoint import (
    CHECKPOINT_FILE,
    STUDENT_FILE,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from distillab.engine.evaluate import evaluate
from distillab.engine.schedule import learning_rate
from distillab.errors import CheckpointError, DistillabError
from distillab.methods.base import Method

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CIFAR_AUGMENT = AugmentConfig(crop_padding=4, flip=True)


class NonFiniteLossError(DistillabError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillabError(f"train.device={name!r} but CUDA is not available; use cpu or auto")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Trainer:
    """Trains `method` on `data.train`, evaluating the student on `data.val` and `data.test` each epoch.

    `augment` is the batch augmentation of the training loader (default: crop with 4-pixel padding
    and flip, the CIFAR recipe; None for none). `info` is merged into the summary.

    With a `run_dir` it writes `metrics.jsonl`, `checkpoints/last.pt` (atomic, every epoch),
    `summary.json` and `student.safetensors`, and `fit(resume=True)` continues exactly where the last
    checkpoint left off (weights, side modules, optimizer, scaler, RNG, epoch; the loader's order and
    augmentation depend only on the seed and the epoch).
    """

    def __init__(self, method: Method, data: DataSplits, cfg: TrainConfig | None = None, *, seed: int = 0,
                 run_dir: str | Path | None = None, info: dict[str, Any] | None = None,
                 augment: AugmentConfig | None = CIFAR_AUGMENT, console: Console | None = None,
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        self.method, self.data, self.cfg = method, data, cfg or TrainConfig()
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.info = dict(info or {})
        self.console = console or Console()
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(self.cfg.device)
        self.amp_dtype = autocast_dtype(self.cfg.amp, self.device)
        if len(data.train) < self.cfg.batch_size and self.cfg.drop_last:
            raise DistillabError(f"train.batch_size={self.cfg.batch_size} exceeds the {len(data.train)} "
                                 "training images and drop_last is on: no batch would run")
        self.method.to(self.device)
        if self.cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.loader = DeviceLoader(data.train, self.cfg.batch_size, device=self.device, shuffle=True,
                                   augment=augment, drop_last=self.cfg.drop_last,
                                   seed=seed, channels_last=self.cfg.channels_last)
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step_fn = torch.compile(method) if self.cfg.compile else method
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "sgd":
            return torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)
        return torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay)

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "method": self.method.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "version": distillab.__version__,
        }

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        try:
            self.method.load_trainable_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: does not match this run's method/optimizer: {exc}") from None
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.start_epoch = int(state["epoch"])
        self.history = [m for m in self._read_metrics() if m["epoch"] <= self.start_epoch]
        self._rewrite_metrics()

    def _read_metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _rewrite_metrics(self) -> None:
        text = "".join(json.dumps(m) + "\n" for m in self.history)
        (self.run_dir / METRICS_FILE).write_text(text)

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `cfg.epochs`; returns the summary (also written to `summary.json`)."""
        ckpt = self.run_dir / CHECKPOINT_FILE if self.run_dir else None
        if resume and ckpt is not None and ckpt.is_file():
            self._restore(ckpt)
            self.console.print(f"resumed {self.run_dir} at epoch {self.start_epoch}/{self.cfg.epochs}")
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        writer = self._tensorboard()
        if self.start_epoch == 0 and self.method.teacher is not None and "teacher_test_acc" not in self.info:
            self.info["teacher_test_acc"] = self._eval(self.method.teacher, self.data.test)["acc"]
        started = time.perf_counter()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                record = self._train_epoch(epoch)
                self.history.append(record)
                self._print_epoch(record)
                if self.run_dir is not None:
                    with open(self.run_dir / METRICS_FILE, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if (epoch + 1) % self.cfg.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs:
                        save_checkpoint(self._state(epoch + 1), ckpt)
                if writer is not None:
                    for key, value in record.items():
                        if isinstance(value, (int, float)) and key != "epoch":
                            writer.add_scalar(key, value, record["epoch"])
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch + 1, record)
        finally:
            if writer is not None:
                writer.close()
        summary = self._summary(time.perf_counter() - started)
        if self.run_dir is not None:
            save_safetensors(self.method.deploy_student(), self.run_dir / STUDENT_FILE,
                             metadata={"model": str(self.info.get("student", ""))})
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        method, cfg = self.method, self.cfg
        method.train()
        method.set_progress(epoch, cfg.epochs)
        self.loader.set_epoch(epoch)
        steps = len(self.loader)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        refresh = max(1, steps // 20)
        start = time.perf_counter()
        with self._progress() as progress:
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, terms="")
            for step, (images, labels) in enumerate(self.loader):
                lr = learning_rate(cfg.schedule, cfg.optim.lr, epoch, step, steps, cfg.epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with amp:
                    logits, terms = self.step_fn(images, labels)
                loss = sum(terms.values())
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.optim.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                with torch.no_grad():
                    for key, value in terms.items():
                        sums[key] = sums.get(key, 0) + value.detach().float() * len(labels)
                    correct += (logits.argmax(1) == labels).sum()
                seen += len(labels)
                if (step + 1) % refresh == 0 or step + 1 == steps:
                    means = self._check_finite(sums, seen, epoch, step)
                    rate = seen / (time.perf_counter() - start)
                    progress.update(task, completed=step + 1,
                                    terms=" ".join(f"{k} {v:.3f}" for k, v in means.items())
                                    + f"  {rate:,.0f} img/s")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        means = self._check_finite(sums, seen, epoch, steps - 1)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "loss": sum(means.values())}
        record.update({f"loss_{k}": v for k, v in means.items()})
        record["train_acc"] = 100.0 * correct.item() / seen
        record["images_per_s"] = seen / elapsed
        record["epoch_time_s"] = elapsed
        if self.data.val is not None:
            val = self._eval(method.student, self.data.val)
            record["val_acc"], record["val_loss"] = val["acc"], val["loss"]
        test = self._eval(method.student, self.data.test)
        record["test_acc"], record["test_loss"] = test["acc"], test["loss"]
        return record

    def _check_finite(self, sums: dict[str, torch.Tensor], seen: int, epoch: int, step: int) -> dict[str, float]:
        means = {k: v.item() / seen for k, v in sums.items()}
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in means.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, by step {step + 1} (terms {terms}); "
                f"the last good checkpoint is kept: lower the learning rate or check the inputs"
            )
        return means

    def _eval(self, model: torch.nn.Module, dataset) -> dict[str, float]:
        return evaluate(model, dataset, device=self.device, batch_size=self.cfg.eval_batch_size,
                        autocast_dtype=self.amp_dtype, channels_last=self.cfg.channels_last)

    # -- reporting ----------------------------------------------------------------------------
    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[terms]}"), TimeRemainingColumn(),
                        console=self.console, transient=True, disable=not self.cfg.progress)

    def _print_epoch(self, r: dict[str, Any]) -> None:
        terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("loss_"))
        val = f" val {r['val_acc']:.2f}%" if "val_acc" in r else ""
        self.console.print(f"epoch {r['epoch']}/{self.cfg.epochs} loss {r['loss']:.3f} ({terms}) "
                           f"train {r['train_acc']:.2f}%{val} test {r['test_acc']:.2f}% "
                           f"lr {r['lr']:.3g} {r['images_per_s']:,.0f} img/s")

    def _tensorboard(self):
        if not self.cfg.tensorboard or self.run_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise DistillabError("train.tensorboard=true needs the tensorboard package: "
                                 "pip install 'distillab[tensorboard]'") from exc
        return SummaryWriter(str(self.run_dir / "tb"))

    def _summary(self, wall_s: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        with_val = [r for r in self.history if "val_acc" in r]
        best_val = max(with_val, key=lambda r: r["val_acc"]) if with_val else None
        student = self.method.deploy_student()
        return {
            **self.info,
            "method": self.method.name,
            "seed": self.seed,
            "epochs": self.cfg.epochs,
            "test_acc": last.get("test_acc"),
            "val_acc": last.get("val_acc"),
            "train_acc": last.get("train_acc"),
            "best_val": ({"epoch": best_val["epoch"], "val_acc": best_val["val_acc"],
                          "test_acc": best_val["test_acc"]} if best_val else None),
            "best_epoch_test_acc": max((r["test_acc"] for r in self.history), default=None),
            "images_per_s": (sum(r["images_per_s"] for r in self.history) / len(self.history)
                             if self.history else None),
            "student_params": sum(p.numel() for p in student.parameters()),
            "side_params": self.method.side_parameter_count(),
            "wall_time_s": wall_s,
            "environment": {"torch": torch.__version__, "distillab": distillab.__version__,
                            "device": device_name(self.device), "threads": torch.get_num_threads(),
                            "python": platform.python_version()},
        }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
