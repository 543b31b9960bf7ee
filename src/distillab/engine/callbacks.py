"""What the training loop does besides training, at named points: `Callback`s.

The loop (`engine/trainer.py`) calls, in the order of `Trainer.callbacks`:

    on_fit_start(trainer)               before the first epoch this process trains
    on_batch(trainer, batches)          before each optimisation step, with the step's `Batch`es
    on_epoch_end(trainer, record)       after each epoch, with its record (as written to metrics.jsonl)
    on_fit_end(trainer, summary)        after the last epoch, with the run's summary (before it is written)
    on_fit_error(trainer)               when the fit stops with an exception (it is raised again after)

The built-in ones: the teacher cache, trackers, the epoch line, the run's files and checkpoints; a Trainer's
`callbacks` argument adds the user's own after them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillab.config import TrainConfig
from distillab.data import DataSplits, DeviceLoader
from distillab.data.batch import Batch
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
from distillab.engine.distributed import World, all_reduce_sum
from distillab.engine.eta import RunClock, format_duration
from distillab.engine.run_files import METRICS_FILE, STEPS_FILE, SUMMARY_FILE, read_metrics
from distillab.engine.teacher_cache import (
    DTYPES,
    VIEWS_DIR,
    CachedTeacher,
    build_teacher_cache,
    fingerprint,
    output_bytes,
)
from distillab.engine.trackers import CSV_FILE, Trackers, write_csv
from distillab.errors import CheckpointError, DistillabError
from distillab.methods.base import Method


class Trainer(Protocol):
    """What a callback may read and set of the `engine.trainer.Trainer` that calls it (declared here, so that
    this module does not import the loop that imports it)."""

    method: Method
    data: DataSplits
    cfg: TrainConfig
    device: torch.device
    world: World
    console: Console
    info: dict[str, Any]
    run_config: dict[str, Any]
    run_dir: Path | None
    loader: DeviceLoader
    needs_indices: bool
    teacher_cached: bool
    amp_dtype: torch.dtype | None
    trackers: Trackers | None
    history: list[dict[str, Any]]
    start_epoch: int
    start_step: int
    partial: dict[str, Any] | None
    restored: bool
    saved_epoch: int | None
    checkpoint_config: dict[str, Any] | None

    @property
    def writes(self) -> bool: ...
    @property
    def steps_per_epoch(self) -> int: ...
    def state(self, epoch: int, step: int = 0, partial: dict[str, Any] | None = None) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def autocast(self) -> AbstractContextManager: ...


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_batch(self, trainer: Trainer, batches: Sequence[Batch]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...
    def on_fit_error(self, trainer: Trainer) -> None: ...


class EpochHook(Callback):
    """Calls `fn(epochs_done, record)` after each epoch (e.g. a suite recording its progress)."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.fn(record["epoch"], record)


class TeacherCaching(Callback):
    """Where every epoch shows the same images (no augmentation) or one of K fixed views of each
    (`train.teacher_views`), and `train.cache_teacher` is on, the teacher's outputs for the training set are
    computed once (with progress; each finished view saved in the run directory, so an interrupted build resumes)
    and a `CachedTeacher` stands in for the method's teacher during the fit."""

    def __init__(self) -> None:
        self.teacher: torch.nn.Module | None = None  # the real one, while the cached one stands in
        self.cached: CachedTeacher | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.teacher_cached or trainer.start_epoch >= trainer.cfg.epochs:
            return
        method, cfg, loader, started = trainer.method, trainer.cfg, trainer.loader, time.perf_counter()
        dtype = DTYPES[cfg.teacher_cache_dtype]
        views = loader.views or 1
        size = sum(output_bytes(method.teacher, method.teacher_taps, method.input_shape, dtype).values())
        limit = int(cfg.teacher_cache_gib * 2**30)
        if size * loader.dataset_size * views > limit:  # only without views: check_setup refuses those
            trainer.teacher_cached = False
            loader.with_indices = trainer.needs_indices
            trainer.console.print(f"teacher outputs not cached: more than train.teacher_cache_gib="
                                  f"{cfg.teacher_cache_gib:g}")
            return
        store = trainer.run_dir / VIEWS_DIR if trainer.writes and loader.views is not None else None
        facts = fingerprint({"teacher": trainer.info.get("teacher_sha256"), "seed": loader.seed, "views": views,
                             "padding": loader.padding, "flip": loader.flip, "images": loader.dataset_size,
                             "taps": [n for tap in method.teacher_taps for n in tap.names], "dtype": str(dtype),
                             "channels_last": cfg.channels_last, "amp": str(trainer.amp_dtype)})
        with self._progress(trainer, views * loader.dataset_size) as advance:
            cache = build_teacher_cache(method.teacher, method.teacher_taps, lambda k: self._view(trainer, k),
                                        views, loader.dataset_size, trainer.autocast, dtype=dtype, store=store,
                                        facts=facts, advance=advance)
        self.teacher, self.cached = method.teacher, CachedTeacher(cache, method.teacher_taps)
        method.teacher = self.cached
        trainer.info["teacher_cache_s"] = round(time.perf_counter() - started, 2)
        what = (f"{views} fixed views of each of {loader.dataset_size:,} images" if loader.views is not None else
                f"{loader.dataset_size:,} images (no augmentation, so they are the same each epoch)")
        trainer.console.print(f"teacher outputs cached for {what}: {cache.nbytes / 2**20:,.1f} MiB, "
                              f"{trainer.info['teacher_cache_s']:.1f} s")

    @staticmethod
    def _view(trainer: Trainer, view: int) -> Iterator[torch.Tensor]:
        """The training images in dataset order, in fixed view `view` (as they are: without views)."""
        cfg, loader = trainer.cfg, trainer.loader
        if loader.views is not None:
            return loader.view_batches(view, cfg.eval_batch_size)
        plain = DeviceLoader(trainer.data.train, cfg.eval_batch_size, device=trainer.device, shuffle=False,
                             channels_last=cfg.channels_last)
        return (batch.images for batch in plain)

    @staticmethod
    @contextlib.contextmanager
    def _progress(trainer: Trainer, total: int) -> Iterator[Callable[[int], None]]:
        with Progress(TextColumn("teacher outputs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=trainer.console, transient=True, disable=not trainer.cfg.progress) as progress:
            task = progress.add_task("", total=total)
            yield lambda n: progress.advance(task, n)

    def on_batch(self, trainer: Trainer, batches: Sequence[Batch]) -> None:
        if self.cached is not None:
            batch = batches[0]
            self.cached.rows = (batch.indices if batch.views is None
                                else batch.views * self.cached.cache.images_per_view + batch.indices)

    @contextlib.contextmanager
    def real_teacher(self, trainer: Trainer) -> Iterator[None]:
        """The real teacher back in the method while the block runs (to run it on images the cache does not hold)."""
        if self.cached is None:
            yield
            return
        trainer.method.teacher = self.teacher
        try:
            yield
        finally:
            trainer.method.teacher = self.cached

    def _restore(self, trainer: Trainer) -> None:
        if self.teacher is not None:
            trainer.method.teacher = self.teacher
        self.teacher = self.cached = None

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._restore(trainer)

    def on_fit_error(self, trainer: Trainer) -> None:
        self._restore(trainer)


class Tracking(Callback):
    """The trackers of `train.trackers` (rank 0 of a run with a directory): each epoch, each logged step (via
    `StepLog`) and the summary."""

    def on_fit_start(self, trainer: Trainer) -> None:
        names = trainer.cfg.tracker_names
        trainer.trackers = None if not names or not trainer.writes else Trackers(
            names, trainer.run_dir, str(trainer.info.get("run", trainer.run_dir.name)),
            str(trainer.info.get("run_id", trainer.run_dir.name)), {**trainer.run_config, "info": trainer.info})

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.trackers is not None:
            trainer.trackers.epoch(record)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._finish(trainer, summary)

    def on_fit_error(self, trainer: Trainer) -> None:
        self._finish(trainer, None)

    @staticmethod
    def _finish(trainer: Trainer, summary: dict[str, Any] | None) -> None:
        if trainer.trackers is not None:
            trainer.trackers.finish(summary)
        trainer.trackers = None


class EpochLine(Callback):
    """One line per epoch on the console: loss terms, accuracies, learning rate, speed, and the time the run has
    left (`eta`, from the epochs timed so far: engine/eta.py). Its `clock` serves the mid-epoch progress too."""

    def __init__(self) -> None:
        self.clock = RunClock(1)

    def on_fit_start(self, trainer: Trainer) -> None:
        self.clock = RunClock(trainer.cfg.epochs, trainer.cfg.eval_every)
        self.clock.start()

    def on_epoch_end(self, trainer: Trainer, r: dict[str, Any]) -> None:
        self.clock.epoch_done(r)
        terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("loss_"))
        val = f" val {r['val_acc']:.2f}%" if "val_acc" in r else ""
        test = f" test {r['test_acc']:.2f}%" if "test_acc" in r else ""
        left = self.clock.left(r["epoch"])
        eta = f" eta {format_duration(left)}" if left is not None and r["epoch"] < trainer.cfg.epochs else ""
        trainer.console.print(f"epoch {r['epoch']}/{trainer.cfg.epochs} loss {r['loss']:.3f} ({terms}) "
                              f"train {r['train_acc']:.2f}%{val}{test} "
                              f"lr {r['lr']:.3g} {r['images_per_s']:,.0f} img/s{eta}")


class RunFiles(Callback):
    """metrics.jsonl and metrics.csv each epoch (cut back to the checkpoint's epochs on resume); at the end the
    method's outputs, the deployed network (student.safetensors) and summary.json. Rank 0 of a run with a
    directory only."""

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.writes:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            if trainer.restored:
                path = trainer.run_dir / METRICS_FILE
                with writing(path, trainer):
                    write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in trainer.history))

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.writes:
            with writing(trainer.run_dir / METRICS_FILE, trainer), \
                    open(trainer.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            with writing(trainer.run_dir / CSV_FILE, trainer):
                write_csv(trainer.run_dir, trainer.history)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if not trainer.writes:
            return
        run_dir, method = trainer.run_dir, trainer.method
        with writing(run_dir, trainer):
            summary.update(method.write_outputs(run_dir))
        with writing(run_dir / STUDENT_FILE, trainer):
            save_safetensors(method.deploy(), run_dir / STUDENT_FILE,
                             metadata={"model": str(trainer.info.get("student", ""))})
        with writing(run_dir / SUMMARY_FILE, trainer):
            write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


class Checkpoints(Callback):
    """checkpoints/last.pt (atomic) every `train.checkpoint_every` epochs and at the last; `restore` reads one
    back. A checkpoint holds everything `fit(resume=True)` needs to continue exactly (see `Trainer.state`)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        if trainer.writes and (epoch % trainer.cfg.checkpoint_every == 0 or epoch == trainer.cfg.epochs):
            self.save(trainer, epoch)

    @staticmethod
    def save(trainer: Trainer, epoch: int, step: int = 0, partial: dict[str, Any] | None = None) -> None:
        path = trainer.run_dir / CHECKPOINT_FILE
        with writing(path, trainer):
            save_checkpoint(trainer.state(epoch, step, partial), path)
        trainer.saved_epoch = epoch

    @staticmethod
    def restore(trainer: Trainer, path: Path) -> None:
        """Load a checkpoint into `trainer`; one that is corrupt, edited, another run's or past the run's end is
        refused with a CheckpointError before anything is restored."""
        state = load_checkpoint(path)
        check_training_state(state, path)
        theirs, ours = state["run_id"], trainer.info.setdefault("run_id", state["run_id"])
        if theirs != ours:
            raise CheckpointError(f"{path}: belongs to another run (run id {theirs}; this run's is {ours}): "
                                  "it was copied here from elsewhere")
        epoch, step, epochs = state["epoch"], state["step"], trainer.cfg.epochs
        if epoch > epochs or (epoch == epochs and step):
            at = f"epoch {epoch}" + (f", step {step}" if step else "")
            raise CheckpointError(f"{path}: the checkpoint is at {at}, past the end of train.epochs={epochs}: set "
                                  f"train.epochs to at least {epoch + bool(step)} (a run is not shortened)")
        if step >= trainer.steps_per_epoch:
            raise CheckpointError(f"{path}: step {step} lies past the {trainer.steps_per_epoch} steps of an epoch "
                                  "of this run")
        history = [m for m in read_metrics(trainer.run_dir, trainer.console) if m["epoch"] <= epoch]
        try:
            trainer.load_state(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path}: does not match this run's method/optimizer: {first_line(exc)}") from None
        trainer.start_epoch = trainer.saved_epoch = epoch
        trainer.start_step = step
        trainer.partial = state["partial"] or None
        trainer.checkpoint_config = state.get("config")
        trainer.history = history  # metrics.jsonl is cut back to it when `fit` starts: restoring writes nothing
        trainer.restored = True
        trainer.console.print(f"resumed {trainer.run_dir} at epoch {epoch}/{epochs}" + (f", step {step}" if step
                                                                                      else ""))


def fingerprinted(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's record of the run's resolved config, with its SHA-256."""
    return {"config": config, "config_sha256": config_fingerprint(config)}


@contextlib.contextmanager
def writing(path: Path, trainer: Trainer) -> Iterator[None]:
    """A failed write (full disk, read-only folder) stops the run with one line; what was written before (the
    last good checkpoint above all) is kept, since every file is written atomically."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        kept = (f"the last good checkpoint, epoch {trainer.saved_epoch}, is kept" if trainer.saved_epoch is not None
                else "no checkpoint had been written yet")
        raise DistillabError(f"{describe_write_failure(exc)} while writing {path}; {kept}") from None


class StepLog:
    """With `train.log_steps`: one line per step in steps.jsonl (the global batch's mean loss terms and logged
    values; every rank takes part in the reduction) and to the trackers."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.file = None

    def __enter__(self) -> StepLog:
        t = self.trainer
        if t.cfg.log_steps and t.writes:
            self.file = open(t.run_dir / STEPS_FILE, "a")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

    def __call__(self, epoch: int, step: int, lr: float, terms: dict[str, torch.Tensor], n: int,
                 global_step: int) -> None:
        t = self.trainer
        values = torch.stack([v.detach().float() * n for v in terms.values()]
                             + [torch.tensor(float(n), device=t.device)])
        values = all_reduce_sum(values, t.world).tolist()
        if self.file is not None:
            line = {"epoch": epoch + 1, "step": step, "lr": lr}
            line.update({k: v / values[-1] for k, v in zip(terms, values[:-1], strict=True)})
            self.file.write(json.dumps(line) + "\n")
            if t.trackers is not None:
                t.trackers.step(line, global_step)
