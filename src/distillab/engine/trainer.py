"""The one training loop every method runs in: set-up, the loop, one optimisation step. Everything else it does
(checkpoints, metrics files, trackers, the teacher cache, the epoch line) is a callback (engine/callbacks.py)."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import distillab
from distillab.config import AugmentConfig, TrainConfig
from distillab.console import make_console
from distillab.data import DataSplits, DeviceLoader
from distillab.data.batch import Batch
from distillab.data.loader import derive_seed
from distillab.engine.callbacks import (
    Callback,
    Checkpoints,
    EpochHook,
    EpochLine,
    RunFiles,
    StepLog,
    TeacherCaching,
    Tracking,
    fingerprinted,
)
from distillab.engine.checkpoint import CHECKPOINT_FILE
from distillab.engine.device import autocast_dtype, data_parallel, device_name, resolve_device
from distillab.engine.distributed import World, all_reduce_sum, barrier, current_world, local_device
from distillab.engine.epoch_meter import EpochMeter, NonFiniteLossError
from distillab.engine.eta import format_duration
from distillab.engine.evaluate import eval_loader, evaluate_sums, probe_sums
from distillab.engine.run_files import SUMMARY_FILE
from distillab.engine.schedule import learning_rate
from distillab.engine.stopping import StopSignals, TrainingStopped
from distillab.engine.teacher_cache import DTYPES, check_cache_size, output_bytes
from distillab.engine.teacher_fold import fold_method_teacher
from distillab.engine.trackers import Trackers
from distillab.errors import DistillabError
from distillab.methods import capabilities
from distillab.methods.base import Method

__all__ = ["CIFAR_AUGMENT", "NonFiniteLossError", "TeacherAtChance", "Trainer", "TrainingStopped", "check_batch",
           "check_setup"]

CIFAR_AUGMENT = AugmentConfig(crop_padding=4, flip=True)


def check_batch(cfg: TrainConfig, n_train: int, world: World) -> int:
    """The per-rank batch: train.batch_size is the global batch, split evenly over the ranks."""
    batch = cfg.batch_size
    if batch > n_train:
        raise DistillabError(f"train.batch_size={batch} exceeds the {n_train} training images")
    if batch % world.world_size:
        raise DistillabError(f"train.batch_size={batch} (the global batch) must be divisible by the "
                             f"{world.world_size} processes")
    return batch // world.world_size


def check_setup(method: Method, data: DataSplits, cfg: TrainConfig, world: World, device: torch.device) -> int:
    """What a Trainer refuses, checked without building one (so that a run can be refused before anything on disk
    changes); returns the per-rank batch."""
    if tuple(method.input_shape) != tuple(data.image_shape):
        shape = "x".join(map(str, data.image_shape))
        raise DistillabError(f"the method was built for {'x'.join(map(str, method.input_shape))} inputs but the "
                             f"data are {shape}: build it with input_shape={tuple(data.image_shape)}")
    parts = capabilities.train_parts(method, len(data.train))
    local_batch = check_batch(cfg, min(len(p) for p in parts) if parts else len(data.train), world)
    if world.distributed and not method.distributed_ok:
        raise DistillabError(f"method {method.name!r} keeps per-process state (e.g. a memory bank) and does not "
                             "support data-parallel training: run it on one process")
    if cfg.sync_bn and device.type != "cuda":
        raise DistillabError("train.sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")
    if cfg.teacher_views is not None and cacheable(method, cfg):  # a cache too large is refused before any work
        per_image = output_bytes(method.teacher, method.teacher_taps, method.input_shape,
                                 DTYPES[cfg.teacher_cache_dtype])
        check_cache_size(per_image, len(data.train), cfg.teacher_views, cfg.teacher_cache_gib)
    return local_batch


CHANCE_SIGMAS = 3.0  # how many binomial standard errors above chance a teacher must be


class TeacherAtChance(DistillabError):
    """A teacher loaded from weights scores no better than guessing on the run's data."""


def chance_threshold(num_classes: int, images: int, sigmas: float = CHANCE_SIGMAS) -> float:
    """The accuracy (%) a classifier must exceed not to count as guessing: chance, 100/num_classes, plus `sigmas`
    binomial standard errors sqrt(p (1 - p) / images) of a split of `images` images (p = 1/num_classes)."""
    p = 1.0 / num_classes
    return 100.0 * (p + sigmas * math.sqrt(p * (1.0 - p) / images))


def check_above_chance(acc: float, images: int, num_classes: int, split: str, what: str = "the teacher") -> None:
    """Refuse (TeacherAtChance) an accuracy `acc` (%) on `images` images that is not above `chance_threshold`."""
    needed = chance_threshold(num_classes, images)
    if acc <= needed:
        raise TeacherAtChance(
            f"{what} scores {acc:.2f} % on the {images:,} {split} images, which is at chance: not above "
            f"100/{num_classes} = {100 / num_classes:.2f} % by {CHANCE_SIGMAS:g} binomial standard errors (more "
            f"than {needed:.2f} % needed). It would teach nothing: are its weights trained on this dataset, with the "
            "same classes, and is teacher.name its architecture?")


def cacheable(method: Method, cfg: TrainConfig) -> bool:
    """Whether the teacher's outputs may stand in for it (where every epoch shows the same images or views)."""
    return (cfg.cache_teacher and method.caches_teacher and method.teacher is not None
            and not isinstance(method, capabilities.BilevelSearch) and not capabilities.wants_strong_view(method))



class Trainer:
    """Trains `method` on `data.train`, evaluating its deployed network on `data.val` and `data.test` each epoch.

    `augment` is the batch augmentation of the training loader (default: crop with 4-pixel padding and flip, the
    CIFAR recipe; None for none). `info` is merged into the summary. `callbacks` run after the built-in ones
    (engine/callbacks.py); `on_epoch_end(epochs_done, record)` is a shorthand for one.

    With a `run_dir` it writes `metrics.jsonl`, `checkpoints/last.pt` (atomic), `summary.json` and
    `student.safetensors`, and `fit(resume=True)` continues exactly where the last checkpoint left off (weights,
    side modules, optimizer, scaler, RNG, epoch and step; the loader's order and augmentation depend only on the
    seed and the epoch).
    """

    def __init__(self, method: Method, data: DataSplits, cfg: TrainConfig | None = None, *, seed: int = 0,
                 run_dir: str | Path | None = None, info: dict[str, Any] | None = None,
                 augment: AugmentConfig | None = CIFAR_AUGMENT, console: Console | None = None,
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
                 run_config: dict[str, Any] | None = None, callbacks: Sequence[Callback] = ()) -> None:
        self.method, self.data, self.cfg, self.seed = method, data, cfg or TrainConfig(), seed
        self.run_config = dict(run_config or {"train": self.cfg.model_dump(mode="json")})  # what trackers record
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.info = dict(info or {})
        self.console = console or make_console()
        self.world: World = current_world()
        self.device = local_device(resolve_device(self.cfg.device), self.world)
        self.amp_dtype = autocast_dtype(self.cfg.amp, self.device)
        self.needs_indices = capabilities.needs_indices(method)
        self._place_method(check_setup(method, data, self.cfg, self.world, self.device), augment)
        self.eval_loaders = {  # every rank evaluates its own strided share of each split
            split: eval_loader(ds.subset(torch.arange(self.world.rank, len(ds), self.world.world_size)),
                               self.device, self.cfg.eval_batch_size, self.cfg.channels_last)
            for split, ds in (("val", data.val), ("test", data.test)) if ds is not None
        }
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        step_fn: torch.nn.Module = method
        if self.world.distributed:
            step_fn = data_parallel(method, self.device, self.cfg.find_unused_parameters)
        self.step_fn = torch.compile(step_fn, mode=self.cfg.compile_mode) if self.cfg.compile else step_fn
        self.callbacks: list[Callback] = [TeacherCaching(), Tracking(), EpochLine(), RunFiles(), Checkpoints(),
                                          *([EpochHook(on_epoch_end)] if on_epoch_end else []), *callbacks]
        self.start_epoch = self.start_step = 0
        self.partial: dict[str, Any] | None = None  # accumulators of an epoch stopped half-way
        self.history: list[dict[str, Any]] = []
        self.trackers: Trackers | None = None  # set by the Tracking callback while a fit runs
        self.signals = StopSignals()
        self._first_epoch = 0
        self.restored = False
        self.saved_epoch: int | None = None  # epochs in the last checkpoint written or read
        self.checkpoint_config: dict[str, Any] | None = None  # the resolved config a restored checkpoint recorded

    def _place_method(self, local_batch: int, augment: AugmentConfig | None) -> None:
        """Bind the method to the data, move it to the device, and build the training loaders (one per part of
        a bi-level search); decide whether the teacher is cached or folded."""
        method, cfg = self.method, self.cfg
        parts = capabilities.train_parts(method, len(self.data.train))  # None: one loader over the training set
        if self.needs_indices:
            method.bind_train_set(self.data.train.labels)
        if cfg.sync_bn:
            for name, child in method.named_children():
                if name != "teacher":
                    setattr(method, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
        method.to(self.device)
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        self.loaders = [
            DeviceLoader(self.data.train if part is None else self.data.train.subset(part), local_batch,
                         device=self.device, shuffle=True, augment=augment, drop_last=cfg.drop_last or cfg.compile,
                         seed=self.seed if part is None else derive_seed("train-part", k, self.seed),
                         rank=self.world.rank, world_size=self.world.world_size, channels_last=cfg.channels_last,
                         with_indices=self.needs_indices, strong_view=capabilities.wants_strong_view(method),
                         views=cfg.teacher_views if augment is not None else None)
            for k, part in enumerate(parts or [None])]
        self.loader = self.loaders[0]
        self.teacher_cached = cacheable(method, cfg) and (not self.loader.augmenting or self.loader.views is not None)
        self.loader.with_indices = self.needs_indices or self.teacher_cached  # positions = the cache's rows
        if cfg.fold_teacher_bn and method.teacher is not None and not self.teacher_cached:
            self.info["teacher_bn_folded"] = fold_method_teacher(method, cfg.channels_last)

    @property
    def writes(self) -> bool:
        """Only rank 0 writes files."""
        return self.run_dir is not None and self.world.is_main

    @property
    def steps_per_epoch(self) -> int:
        return min(len(loader) for loader in self.loaders)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "sgd":
            return torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)
        return torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay)

    # -- training state -----------------------------------------------------------------------
    def state(self, epoch: int, step: int = 0, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a checkpoint holds: `epoch` epochs done, plus `step` batches of the next one (with its `partial`
        accumulators)."""
        return {
            "epoch": epoch, "step": step, "partial": partial or {},
            "method": self.method.trainable_state_dict(), "method_extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "version": distillab.__version__,
            "run_id": self.info.setdefault("run_id", uuid.uuid4().hex),  # a Trainer used on its own: one of its own
            **fingerprinted(self.run_config),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the weights, optimizer, scaler and RNG of a checkpoint's `state` (see `restore`)."""
        self.method.load_trainable_state_dict(state["method"])
        self.method.load_extra_state(state["method_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def restore(self, path: Path) -> None:
        """Load a checkpoint (refused with a CheckpointError, before anything is restored, when it is corrupt,
        edited, another run's or past this run's end); `fit` continues from it. The config it was trained with
        is kept as `checkpoint_config`."""
        Checkpoints.restore(self, path)

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `cfg.epochs`; returns the summary (also written to `summary.json`).

        SIGTERM / SIGINT stop the run at the next step with a checkpoint (`TrainingStopped`);
        `fit(resume=True)` continues from it, mid-epoch included, exactly.
        """
        ckpt = self.run_dir / CHECKPOINT_FILE if self.run_dir else None
        if resume and not self.restored and ckpt is not None and ckpt.is_file():
            self.restore(ckpt)
        done = self.run_dir / SUMMARY_FILE if self.run_dir else None
        if self.restored and self.start_epoch >= self.cfg.epochs and not self.start_step and done and done.is_file():
            self.console.print(f"{self.run_dir} has already finished its {self.cfg.epochs} epochs: nothing to do")
            return json.loads(done.read_text())  # a finished run resumed with no new epochs changes nothing
        self.evaluate_teacher()
        self._first_epoch = self.start_epoch  # the epoch in which this process compiles (train.compile)
        started = time.perf_counter()
        try:
            self._call("on_fit_start")
            with self.signals:
                for epoch in range(self.start_epoch, self.cfg.epochs):
                    record = self._train_epoch(epoch)
                    self.history.append(record)
                    self._call("on_epoch_end", record)
                    barrier(self.world)
        except BaseException:
            self._call("on_fit_error")
            raise
        summary = self._summary(time.perf_counter() - started)
        self._call("on_fit_end", summary)
        barrier(self.world)
        return summary

    def evaluate_teacher(self) -> None:
        """The frozen teacher's accuracy before the first epoch, once per run (`train_run` calls it before anything
        is written; `fit` otherwise): `teacher_test_acc`, and `teacher_val_acc` where a validation split is held out.
        A teacher whose weights were loaded (the info records their SHA-256 or source) is refused when it is at
        chance on the validation split (the test split without one): see `check_above_chance`."""
        teacher = self.method.teacher
        if self.start_epoch or teacher is None or "teacher_test_acc" in self.info:
            return
        results = {split: self._eval(teacher, split) for split in ("test", "val") if split in self.eval_loaders}
        for split, result in results.items():
            self.info[f"teacher_{split}_acc"] = result["acc"]
        loaded = "teacher_sha256" in self.info or "teacher_weights" in self.info
        if loaded and not self.data.random_labels:  # random labels: nothing is above chance, nor need it be
            split = "val" if "val" in results else "test"
            where = (self.run_config.get("teacher") or {}).get("checkpoint") or self.info.get("teacher_weights")
            check_above_chance(results[split]["acc"], int(results[split]["n"]), self.data.num_classes, split,
                               f"teacher {self.info.get('teacher', '')} ({where})")

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, steps = self.cfg, self.steps_per_epoch
        self.method.train()
        self.method.set_progress(epoch, cfg.epochs)
        first = self.start_step if epoch == self.start_epoch else 0
        for loader in self.loaders:
            loader.set_epoch(epoch, start_batch=first)
        meter = EpochMeter(self.device, self.world, self.partial if first else None)
        self.partial = None
        refresh = max(1, steps // 20)
        with self._progress(epoch, steps, first) as show, StepLog(self) as log_step:
            for step, batches in enumerate(zip(*self.loaders, strict=False), start=first):
                self._call("on_batch", batches)
                lr = learning_rate(cfg.schedule, cfg.optim.lr, epoch, step, steps, cfg.epochs)
                logits, terms = self.train_step(batches, lr)
                logs = self.method.take_logs()
                meter.add(logits, batches[0].labels, terms, logs)
                if cfg.log_steps:
                    log_step(epoch, step, lr, {**terms, **logs}, batches[0].size, epoch * steps + step)
                if (step + 1) % refresh == 0 or step + 1 == steps:
                    show(step + 1, meter.means(epoch, step), meter.seen / meter.elapsed * self.world.world_size)
                if step + 1 < steps and self.signals.stop_now(step, refresh, self.world, self.device):
                    self._stop(epoch, step + 1, meter.state())
        record = meter.record(epoch, steps, lr)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            for split in self.eval_loaders:  # val (when held out), then test
                result = self._eval(self.method.deployed_network, split)
                record[f"{split}_acc"], record[f"{split}_loss"] = result["acc"], result["loss"]
            if self.method.probes and "val" in self.eval_loaders:
                record.update(self._probe("val"))
        return record

    def train_step(self, batches: Batch | Sequence[Batch], lr: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on `batches` (one per training part) at learning rate `lr`; returns the logits
        and the loss terms."""
        batches = [batches] if isinstance(batches, Batch) else batches
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            logits, terms = self.step_fn(*(a for b in batches for a in b.method_args(self.needs_indices)))
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logits, terms

    def autocast(self):
        """The run's autocast context (a no-op without AMP)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def _stop(self, epoch: int, step: int, partial: dict[str, Any]) -> None:
        where = "no run directory, nothing saved"
        if self.run_dir is not None:
            if self.writes:
                Checkpoints.save(self, epoch, step, partial)
            where = f"checkpoint written; resume with: distillab train --resume {self.run_dir}"
        barrier(self.world)
        raise self.signals.stopped(epoch, step, where)

    def _eval(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        correct, loss, n = all_reduce_sum(evaluate_sums(model, self.eval_loaders[split], self.amp_dtype),
                                          self.world).tolist()
        return {"acc": 100.0 * correct / n, "loss": loss / n, "n": n}

    def _probe(self, split: str) -> dict[str, float]:
        """The method's own metrics (`Method.probe`) as means over `split`, `<split>_probe_<name>`; a cached teacher
        gives way to the real one meanwhile."""
        caching = next((c for c in self.callbacks if isinstance(c, TeacherCaching)), None)
        with caching.real_teacher(self) if caching is not None else contextlib.nullcontext():
            sums = probe_sums(self.method, self.eval_loaders[split], self.amp_dtype)
        *totals, n = all_reduce_sum(sums, self.world).tolist()
        return {f"{split}_probe_{name}": total / n for name, total in zip(self.method.probes, totals, strict=True)}

    # -- reporting ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _progress(self, epoch: int, steps: int, first: int):
        """A progress bar for the epoch, with the time the epoch and (`run eta`) the run have left; yields
        `show(done, means, images_per_s)`."""
        clock = next((c.clock for c in self.callbacks if isinstance(c, EpochLine)), None)
        started = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[terms]}"), TimeRemainingColumn(), TextColumn("{task.fields[eta]}"),
                      console=self.console, transient=True, disable=not self.cfg.progress) as progress:
            task = progress.add_task(f"epoch {epoch + 1}/{self.cfg.epochs}", total=steps, completed=first, terms="",
                                     eta="")

            def show(done: int, means: dict[str, float], rate: float) -> None:
                pace = (time.perf_counter() - started) / max(1, done - first)  # seconds per step of this epoch
                left = None if clock is None else clock.left_during(epoch, done / steps, pace * done)
                progress.update(task, completed=done, terms=" ".join(f"{k} {v:.3f}" for k, v in means.items())
                                + f"  {rate:,.0f} img/s",
                                eta="" if left is None else f"run eta {format_duration(left)}")

            yield show

    def _mean_rate(self) -> float | None:
        """Mean images/s over the epochs; with train.compile, the epoch that compiled (the first one this process
        trained) is left out when there are others."""
        rates = [(r["epoch"], r["images_per_s"]) for r in self.history]
        if self.cfg.compile and len(rates) > 1:
            rates = [(e, v) for e, v in rates if e != self._first_epoch + 1] or rates
        return sum(v for _, v in rates) / len(rates) if rates else None

    def _summary(self, wall_s: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        with_val = [r for r in self.history if "val_acc" in r]
        best_val = max(with_val, key=lambda r: r["val_acc"]) if with_val else None
        return {
            **self.info, "method": self.method.name, "seed": self.seed, "epochs": self.cfg.epochs,
            "test_acc": last.get("test_acc"), "val_acc": last.get("val_acc"), "train_acc": last.get("train_acc"),
            "best_val": ({"epoch": best_val["epoch"], "val_acc": best_val["val_acc"],
                          "test_acc": best_val["test_acc"]} if best_val else None),
            "best_epoch_test_acc": max((r["test_acc"] for r in self.history if "test_acc" in r), default=None),
            "images_per_s": self._mean_rate(),
            "student_params": sum(p.numel() for p in self.method.deploy().parameters()),
            "side_params": self.method.side_parameter_count(),
            "wall_time_s": wall_s,
            "environment": {"torch": torch.__version__, "distillab": distillab.__version__,
                            "device": device_name(self.device), "threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "world_size": self.world.world_size, "python": platform.python_version()},
        }
