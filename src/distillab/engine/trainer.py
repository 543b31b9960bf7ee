"""The one training loop every method runs in."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import distillab
from distillab.config import AugmentConfig, TrainConfig
from distillab.data import DataSplits, DeviceLoader
from distillab.data.loader import derive_seed
from distillab.engine.checkpoint import (
    CHECKPOINT_FILE,
    STUDENT_FILE,
    check_training_state,
    config_fingerprint,
    describe_write_failure,
    first_line,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
    write_text_atomic,
)
from distillab.engine.device import autocast_dtype, data_parallel, device_name, resolve_device
from distillab.engine.distributed import World, all_reduce_sum, barrier, broadcast_flag, current_world, local_device
from distillab.engine.evaluate import eval_loader, evaluate_sums
from distillab.engine.run_files import METRICS_FILE, STEPS_FILE, SUMMARY_FILE, read_metrics
from distillab.engine.schedule import learning_rate
from distillab.engine.teacher_cache import build_teacher_cache
from distillab.engine.teacher_fold import fold_frozen_teacher
from distillab.engine.trackers import CSV_FILE, Trackers, write_csv
from distillab.errors import CheckpointError, DistillabError
from distillab.methods.base import Method

CIFAR_AUGMENT = AugmentConfig(crop_padding=4, flip=True)


class NonFiniteLossError(DistillabError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingStopped(DistillabError):
    """SIGTERM or SIGINT stopped the run after writing a checkpoint it can be resumed from."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


TEACHER_CACHE_MAX_BYTES = 4 * 2**30


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
    parts = method.train_parts(len(data.train))
    local_batch = check_batch(cfg, min(len(p) for p in parts) if parts else len(data.train), world)
    if world.distributed and not method.distributed_ok:
        raise DistillabError(f"method {method.name!r} keeps per-process state (e.g. a memory bank) and does not "
                             "support data-parallel training: run it on one process")
    if cfg.sync_bn and device.type != "cuda":
        raise DistillabError("train.sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")
    return local_batch


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
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        self.method, self.data, self.cfg = method, data, cfg or TrainConfig()
        self.run_config = dict(run_config or {"train": self.cfg.model_dump(mode="json")})  # what trackers record
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.info = dict(info or {})
        self.console = console or Console()
        self.on_epoch_end = on_epoch_end
        device = resolve_device(self.cfg.device)
        self.world: World = current_world()
        self.device = local_device(device, self.world)
        self.amp_dtype = autocast_dtype(self.cfg.amp, self.device)
        local_batch = check_setup(method, data, self.cfg, self.world, self.device)
        parts = method.train_parts(len(data.train))  # None: one loader over the whole training set
        if method.needs_indices:
            method.bind_train_set(data.train.labels)
        if self.cfg.sync_bn:
            for name, child in method.named_children():
                if name != "teacher":
                    setattr(method, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
        self.method.to(self.device)
        if self.cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.loaders = [
            DeviceLoader(data.train if part is None else data.train.subset(part), local_batch, device=self.device,
                         shuffle=True, augment=augment, drop_last=self.cfg.drop_last or self.cfg.compile,
                         seed=seed if part is None else derive_seed("train-part", k, seed), rank=self.world.rank,
                         world_size=self.world.world_size, channels_last=self.cfg.channels_last,
                         with_indices=method.needs_indices, strong_view="strong" in method.extra_views)
            for k, part in enumerate(parts or [None])]
        self.loader = self.loaders[0]
        self.teacher_cached = (self.cfg.cache_teacher and method.caches_teacher and method.teacher is not None
                               and parts is None and not self.loader.augmenting and not self.loader.strong_view)
        self.loader.with_indices = method.needs_indices or self.teacher_cached  # positions = the cache's rows
        if self.cfg.fold_teacher_bn and method.teacher is not None and not self.teacher_cached:
            self._fold_teacher()
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
        self.start_epoch = 0
        self.start_step = 0
        self.partial: dict[str, Any] | None = None  # accumulators of an epoch stopped half-way
        self.history: list[dict[str, Any]] = []
        self._tracking: Trackers | None = None
        self._first_epoch = 0
        self._stop_signal: int | None = None
        self.restored = False
        self.saved_epoch: int | None = None  # epochs in the last checkpoint written or read
        self.checkpoint_config: dict[str, Any] | None = None  # the resolved config a restored checkpoint recorded

    def _cache_teacher(self) -> None:
        """Compute the teacher's outputs for the training set once (`train.cache_teacher`)."""
        started = time.perf_counter()
        loader = DeviceLoader(self.data.train, self.cfg.eval_batch_size, device=self.device, shuffle=False,
                              channels_last=self.cfg.channels_last)
        cache = build_teacher_cache(self.method.teacher, self.method.teacher_taps, loader, self.autocast,
                                    TEACHER_CACHE_MAX_BYTES)
        if cache is None:
            self.teacher_cached = False
            self.loader.with_indices = self.method.needs_indices
            self.console.print(f"teacher outputs not cached: more than {TEACHER_CACHE_MAX_BYTES / 2**30:.0f} GiB")
            return
        self.method.use_teacher_cache(cache)
        self.info["teacher_cache_s"] = round(time.perf_counter() - started, 2)
        self.console.print(f"teacher outputs cached for {len(cache):,} images ({cache.nbytes / 2**20:,.1f} MiB, "
                           f"{self.info['teacher_cache_s']:.1f} s): no augmentation, so they are the same each epoch")

    @property
    def writes(self) -> bool:
        """Only rank 0 writes files."""
        return self.run_dir is not None and self.world.is_main

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "sgd":
            return torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)
        return torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay)

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self, epoch: int, step: int = 0, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """`epoch` epochs done, plus `step` batches of the next one (with its `partial` accumulators)."""
        return {
            "epoch": epoch,
            "step": step,
            "partial": partial or {},
            "method": self.method.trainable_state_dict(),
            "method_extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "version": distillab.__version__,
            "run_id": self.info.setdefault("run_id", uuid.uuid4().hex),  # a Trainer used on its own: one of its own
            "config": self.run_config,
            "config_sha256": config_fingerprint(self.run_config),
        }

    def restore(self, path: Path) -> None:
        """Load a checkpoint; one that is corrupt, edited, another run's or past this run's end is refused with a
        CheckpointError before anything is restored. `fit` continues from it. The config it was trained with is
        kept as `checkpoint_config`."""
        state = load_checkpoint(path)
        check_training_state(state, path)
        theirs, ours = state["run_id"], self.info.setdefault("run_id", state["run_id"])
        if theirs != ours:
            raise CheckpointError(f"{path}: belongs to another run (run id {theirs}; this run's is {ours}): "
                                  "it was copied here from elsewhere")
        epoch, step = state["epoch"], state["step"]
        if epoch > self.cfg.epochs or (epoch == self.cfg.epochs and step):
            at = f"epoch {epoch}" + (f", step {step}" if step else "")
            raise CheckpointError(f"{path}: the checkpoint is at {at}, past the end of train.epochs="
                                  f"{self.cfg.epochs}: set train.epochs to at least {epoch + bool(step)} (a run "
                                  "is not shortened)")
        steps = min(len(loader) for loader in self.loaders)
        if step >= steps:
            raise CheckpointError(f"{path}: step {step} lies past the {steps} steps of an epoch of this run")
        history = [m for m in read_metrics(self.run_dir, self.console) if m["epoch"] <= epoch]
        try:
            self.method.load_trainable_state_dict(state["method"])
            self.method.load_extra_state(state["method_extra"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng_cpu"])
            if state["rng_cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path}: does not match this run's method/optimizer: {first_line(exc)}") from None
        self.start_epoch = self.saved_epoch = epoch
        self.start_step = step
        self.partial = state["partial"] or None
        self.checkpoint_config = state.get("config")
        self.history = history  # metrics.jsonl is cut back to it when `fit` starts: restoring writes nothing
        self.restored = True
        self.console.print(f"resumed {self.run_dir} at epoch {self.start_epoch}/{self.cfg.epochs}"
                           + (f", step {self.start_step}" if self.start_step else ""))

    def _rewrite_metrics(self) -> None:
        with self._writing(self.run_dir / METRICS_FILE):
            write_text_atomic(self.run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.history))

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """A failed write (full disk, read-only folder) stops the run with one line; what was written before
        (the last good checkpoint above all) is kept, since every file is written atomically."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            kept = (f"the last good checkpoint, epoch {self.saved_epoch}, is kept" if self.saved_epoch is not None
                    else "no checkpoint had been written yet")
            raise DistillabError(f"{describe_write_failure(exc)} while writing {path}; {kept}") from None

    def _save_checkpoint(self, epoch: int, step: int = 0, partial: dict[str, Any] | None = None) -> None:
        path = self.run_dir / CHECKPOINT_FILE
        with self._writing(path):
            save_checkpoint(self._state(epoch, step, partial), path)
        self.saved_epoch = epoch

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
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.restored:
                self._rewrite_metrics()
        trackers = self._trackers()
        self._tracking = trackers
        self._first_epoch = self.start_epoch  # the epoch in which this process compiles (train.compile)
        if self.start_epoch == 0 and self.method.teacher is not None and "teacher_test_acc" not in self.info:
            self.info["teacher_test_acc"] = self._eval(self.method.teacher, "test")["acc"]
        started = time.perf_counter()
        if self.teacher_cached and self.start_epoch < self.cfg.epochs:
            self._cache_teacher()
        try:
            with self._stop_on_signals():
                for epoch in range(self.start_epoch, self.cfg.epochs):
                    record = self._train_epoch(epoch)
                    self.history.append(record)
                    self._print_epoch(record)
                    if self.writes:
                        with self._writing(self.run_dir / METRICS_FILE), open(self.run_dir / METRICS_FILE, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        with self._writing(self.run_dir / CSV_FILE):
                            write_csv(self.run_dir, self.history)
                        if (epoch + 1) % self.cfg.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs:
                            self._save_checkpoint(epoch + 1)
                    if trackers is not None:
                        trackers.epoch(record)
                    barrier(self.world)
                    if self.on_epoch_end is not None:
                        self.on_epoch_end(epoch + 1, record)
        except BaseException:
            if trackers is not None:
                trackers.finish(None)
            raise
        finally:
            self.method.use_teacher_cache(None)
            self._tracking = None
        summary = self._summary(time.perf_counter() - started)
        if trackers is not None:
            trackers.finish(summary)
        if self.writes:
            with self._writing(self.run_dir):
                summary.update(self.method.write_outputs(self.run_dir))
            with self._writing(self.run_dir / STUDENT_FILE):
                save_safetensors(self.method.deploy(), self.run_dir / STUDENT_FILE,
                                 metadata={"model": str(self.info.get("student", ""))})
            with self._writing(self.run_dir / SUMMARY_FILE):
                write_text_atomic(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        barrier(self.world)
        return summary

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT ask the loop to stop at the next step; a second SIGINT interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, _frame) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_now(self, step: int, refresh: int) -> bool:
        """Whether to stop after `step`; ranks agree at the refresh points (a collective, so not every step)."""
        if not self.world.distributed:
            return self._stop_signal is not None
        if (step + 1) % refresh:
            return False
        return broadcast_flag(self._stop_signal is not None, self.world, self.device)

    def _stop(self, epoch: int, step: int, partial: dict[str, Any]) -> None:
        signum = self._stop_signal or signal.SIGTERM
        where = "no run directory, nothing saved"
        if self.run_dir is not None:
            if self.writes:
                self._save_checkpoint(epoch, step, partial)
            where = f"checkpoint written; resume with: distillab train --resume {self.run_dir}"
        barrier(self.world)
        raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {step}: "
                              f"{where}", signum)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        method, cfg = self.method, self.cfg
        method.train()
        method.set_progress(epoch, cfg.epochs)
        first = self.start_step if epoch == self.start_epoch else 0
        for loader in self.loaders:
            loader.set_epoch(epoch, start_batch=first)
        steps = min(len(loader) for loader in self.loaders)
        partial = self.partial if first else None
        self.partial = None
        sums: dict[str, torch.Tensor] = {k: v.to(self.device) for k, v in (partial or {}).get("sums", {}).items()}
        logs: dict[str, torch.Tensor] = {k: v.to(self.device) for k, v in (partial or {}).get("logs", {}).items()}
        correct = torch.tensor((partial or {}).get("correct", 0), dtype=torch.long, device=self.device)
        seen = int((partial or {}).get("seen", 0))
        elapsed_before = float((partial or {}).get("elapsed", 0.0))
        refresh = max(1, steps // 20)
        start = time.perf_counter()
        steps_log = open(self.run_dir / STEPS_FILE, "a") if cfg.log_steps and self.writes else None  # noqa: SIM115
        try:
            with self._progress() as progress:
                task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, completed=first, terms="")
                for step, batches in enumerate(zip(*self.loaders, strict=False), start=first):
                    batch = sum(batches, ())  # (images, labels[, indices]) of every part, one after the other
                    if self.teacher_cached:  # the positions are the teacher cache's rows
                        method.set_teacher_rows(batch[2])
                        batch = batch if method.needs_indices else batch[:2] + batch[3:]
                    labels = batch[1]
                    lr = learning_rate(cfg.schedule, cfg.optim.lr, epoch, step, steps, cfg.epochs)
                    logits, terms = self.train_step(batch, lr)
                    step_logs = self.method.take_logs()
                    with torch.no_grad():
                        for key, value in terms.items():
                            sums[key] = sums.get(key, 0) + value.detach().float() * len(labels)
                        for key, value in step_logs.items():
                            logs[key] = logs.get(key, 0) + value.detach().float() * len(labels)
                        correct += (logits.argmax(1) == labels).sum()
                    seen += len(labels)
                    if cfg.log_steps:
                        self._log_step(steps_log, epoch, step, lr, {**terms, **step_logs}, len(labels),
                                       epoch * steps + step)
                    if (step + 1) % refresh == 0 or step + 1 == steps:
                        means = self._check_finite(sums, seen, epoch, step)
                        rate = seen / (elapsed_before + time.perf_counter() - start)
                        progress.update(task, completed=step + 1,
                                        terms=" ".join(f"{k} {v:.3f}" for k, v in means.items())
                                        + f"  {rate * self.world.world_size:,.0f} img/s")
                    if step + 1 < steps and self._stop_now(step, refresh):
                        self._stop(epoch, step + 1, {
                            "sums": {k: v.detach().cpu() for k, v in sums.items()},
                            "logs": {k: v.detach().cpu() for k, v in logs.items()}, "correct": int(correct.item()),
                            "seen": seen, "elapsed": elapsed_before + time.perf_counter() - start})
        finally:
            if steps_log is not None:
                steps_log.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = elapsed_before + time.perf_counter() - start
        means = self._check_finite(sums, seen, epoch, steps - 1)
        totals = all_reduce_sum(torch.tensor([float(correct.item()), float(seen)], dtype=torch.float64,
                                             device=self.device), self.world).tolist()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "loss": sum(means.values())}
        record.update({f"loss_{k}": v for k, v in means.items()})
        record["train_acc"] = 100.0 * totals[0] / totals[1]
        if logs:  # what the method logs besides its loss terms, as epoch means
            keys = list(logs)
            values = all_reduce_sum(torch.stack([logs[k].double() for k in keys]), self.world) / totals[1]
            record.update({f"log_{k}": v for k, v in zip(keys, values.tolist(), strict=True)})
        record["images_per_s"] = totals[1] / elapsed
        record["epoch_time_s"] = elapsed
        evaluate = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        for split in self.eval_loaders if evaluate else ():  # val (when held out), then test
            result = self._eval(method.deployed_network, split)
            record[f"{split}_acc"], record[f"{split}_loss"] = result["acc"], result["loss"]
        return record

    def train_step(self, batch: tuple[torch.Tensor, ...], lr: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on `batch` at learning rate `lr`; returns the logits and the loss terms."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            logits, terms = self.step_fn(*batch)
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

    def _log_step(self, log, epoch: int, step: int, lr: float, terms: dict[str, torch.Tensor], n: int,
                  global_step: int) -> None:
        """One line per step: the global batch's mean loss terms and logged values (all ranks take part in the
        reduction)."""
        values = torch.stack([v.detach().float() * n for v in terms.values()]
                             + [torch.tensor(float(n), device=self.device)])
        values = all_reduce_sum(values, self.world).tolist()
        if log is not None:
            line = {"epoch": epoch + 1, "step": step, "lr": lr}
            line.update({k: v / values[-1] for k, v in zip(terms, values[:-1], strict=True)})
            log.write(json.dumps(line) + "\n")
            if self._tracking is not None:
                self._tracking.step(line, global_step)

    def _check_finite(self, sums: dict[str, torch.Tensor], seen: int, epoch: int, step: int) -> dict[str, float]:
        """Mean loss terms so far over all ranks; a non-finite one stops the run."""
        keys = list(sums)
        totals = torch.stack([sums[k].detach().double() for k in keys] + [torch.tensor(float(seen)).double()
                                                                           .to(self.device)])
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

    def _eval(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        correct, loss, n = all_reduce_sum(evaluate_sums(model, self.eval_loaders[split], self.amp_dtype),
                                          self.world).tolist()
        return {"acc": 100.0 * correct / n, "loss": loss / n}

    # -- reporting ----------------------------------------------------------------------------
    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[terms]}"), TimeRemainingColumn(),
                        console=self.console, transient=True, disable=not self.cfg.progress)

    def _print_epoch(self, r: dict[str, Any]) -> None:
        terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("loss_"))
        val = f" val {r['val_acc']:.2f}%" if "val_acc" in r else ""
        test = f" test {r['test_acc']:.2f}%" if "test_acc" in r else ""
        self.console.print(f"epoch {r['epoch']}/{self.cfg.epochs} loss {r['loss']:.3f} ({terms}) "
                           f"train {r['train_acc']:.2f}%{val}{test} "
                           f"lr {r['lr']:.3g} {r['images_per_s']:,.0f} img/s")

    def _fold_teacher(self) -> None:
        """The frozen teacher with its BNs folded into its convs, where that reproduces it (engine/teacher_fold)."""
        tapped = [name for tap in self.method.teacher_taps for name in tap.names]
        folded, count = fold_frozen_teacher(self.method.teacher, self.method.input_shape, tapped)
        if count:
            if self.cfg.channels_last:
                folded.to(memory_format=torch.channels_last)
            self.method.replace_teacher(folded)
        self.info["teacher_bn_folded"] = count

    def _trackers(self) -> Trackers | None:
        names = self.cfg.tracker_names
        if not names or not self.writes:
            return None
        return Trackers(names, self.run_dir, str(self.info.get("run", self.run_dir.name)),
                        str(self.info.get("run_id", self.run_dir.name)), {**self.run_config, "info": self.info})

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
        student = self.method.deploy()
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
            "best_epoch_test_acc": max((r["test_acc"] for r in self.history if "test_acc" in r), default=None),
            "images_per_s": self._mean_rate(),
            "student_params": sum(p.numel() for p in student.parameters()),
            "side_params": self.method.side_parameter_count(),
            "wall_time_s": wall_s,
            "environment": {"torch": torch.__version__, "distillab": distillab.__version__,
                            "device": device_name(self.device), "threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "world_size": self.world.world_size,
                            "python": platform.python_version()},
        }
