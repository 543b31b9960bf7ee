"""Training throughput of methods against the bound: a student training step plus a teacher forward.

Every method trains through the real `Trainer.train_step` (same loader, augmentation, AMP, compile and
memory format as a run) on seeded random images of the given shape. The bound is what no distillation
method can beat: a plain student training step (method `ce`) plus a teacher forward pass under no_grad,
both measured in the same process. It is measured before and after the methods; the mean is reported
along with the drift between the two, so a machine whose speed changed during the run shows it. With
`fold_teacher_bn` the methods train with the teacher's BatchNorms folded into its convs (as
`train.fold_teacher_bn` does) and the folded teacher forward is measured too, while the bound stays the naive
one (unfolded teacher), so a ratio above 1 is what folding buys. With `teacher_views: K` the methods train on K
fixed views per image with the teacher's outputs cached (`train.teacher_views`): the cache is built before the
timing (its build time and size are reported) and the steps read it instead of running the teacher.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

import distillab
from distillab import methods, models
from distillab.config import (
    MAX_CHANNELS,
    MAX_IMAGE_SIDE,
    AugmentConfig,
    SyntheticConfig,
    TrainConfig,
    format_validation_error,
)
from distillab.console import make_console
from distillab.data import DataSplits
from distillab.data.batch import Batch
from distillab.data.splits import synthetic
from distillab.engine.callbacks import TeacherCaching
from distillab.engine.cpu_memory import keep_freed_memory
from distillab.engine.device import device_name, resolve_device
from distillab.engine.trainer import Trainer
from distillab.errors import ConfigError

MIN_TRAIN_SIZE = 20_000  # methods with a memory bank (CRD: 16,384 negatives) need a training set this large


@dataclass
class ThroughputSpec:
    teacher: str
    student: str
    methods: list[str]
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 100
    batch: int = 64
    device: str = "cpu"
    amp: str = "auto"
    compile: bool = False
    channels_last: bool = TrainConfig.model_fields["channels_last"].default  # as training runs
    warmup: int = 3
    steps: int = 10
    repeats: int = 3
    fold_teacher_bn: bool = False
    teacher_views: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input {text!r}: expected CxHxW, e.g. 3x32x32")
    c, h, w = (int(p) for p in parts)
    if c > MAX_CHANNELS or max(h, w) > MAX_IMAGE_SIDE:
        raise ConfigError(f"--input {text!r}: at most {MAX_CHANNELS} channels and {MAX_IMAGE_SIDE} pixels a side")
    return c, h, w


def measure(spec: ThroughputSpec, console: Console | None = None) -> dict[str, Any]:
    """Images/s (median over repeats) and peak memory of every method and of the bound's two parts; a line each
    on `console` as it is measured (`[k/N] method` for the methods)."""
    console = console or make_console()
    unknown = [m for m in spec.methods if m not in methods.available()]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown)}; "
                          f"available: {', '.join(methods.available())}")
    device = resolve_device(spec.device)
    if device.type == "cpu":
        keep_freed_memory()  # as `distillab train` does, so the figures are those of a real run
    try:
        needed = spec.batch * (spec.warmup + spec.steps)  # a view cache covers only the images the steps see
        synthetic_cfg = SyntheticConfig(image_shape=spec.input_shape, num_classes=spec.num_classes,
                                        train_size=needed if spec.teacher_views else max(needed, MIN_TRAIN_SIZE),
                                        test_size=spec.batch)
    except ValidationError as err:  # the images the measurement would hold: --batch, --input, --steps
        raise ConfigError(format_validation_error(err, SyntheticConfig, "the measurement's data: ")) from None
    data = synthetic(synthetic_cfg, 0)
    cfg = TrainConfig(epochs=1, batch_size=spec.batch, drop_last=True, device=str(device), amp=spec.amp,
                      compile=spec.compile, channels_last=spec.channels_last, progress=False,
                      fold_teacher_bn=spec.fold_teacher_bn, teacher_views=spec.teacher_views)
    naive = cfg.model_copy(update={"fold_teacher_bn": False, "teacher_views": None})

    def bound() -> dict[str, Any]:
        student = _timed(console, "student step (ce)", lambda: _method_rate(spec, "ce", data, naive), spec.repeats)
        teacher = _timed(console, "teacher forward", lambda: _teacher_rate(spec, data, naive), spec.repeats)
        parts = {"student_step": student, "teacher_forward": teacher,
                 "images_per_s": 1.0 / (1.0 / student["images_per_s"] + 1.0 / teacher["images_per_s"])}
        if spec.fold_teacher_bn:
            parts["teacher_forward_folded"] = _timed(console, "teacher forward (BN folded)",
                                                     lambda: _teacher_rate(spec, data, cfg), spec.repeats)
        return parts

    before = bound()
    rows = {name: _timed(console, f"[{k}/{len(spec.methods)}] {name}",
                         lambda name=name: _method_rate(spec, name, data, cfg), spec.repeats)
            for k, name in enumerate(spec.methods, 1)}
    after = bound()
    bound_rate = (before["images_per_s"] + after["images_per_s"]) / 2
    for row in rows.values():
        row["ratio_to_bound"] = row["images_per_s"] / bound_rate
    return {
        "spec": {**asdict(spec), "input_shape": list(spec.input_shape)},
        "environment": {"torch": torch.__version__, "distillab": distillab.__version__,
                        "device": device_name(device), "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "python": platform.python_version()},
        "bound": {"images_per_s": bound_rate, "before": before, "after": after,
                  "drift": after["images_per_s"] / before["images_per_s"] - 1.0},
        "methods": rows,
    }


def _timed(console: Console, label: str, rate: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    with console.status(f"measuring {label}"):
        results = [rate() for _ in range(repeats)]
    console.print(f"{label}: {statistics.median(r['images_per_s'] for r in results):,.1f} img/s")
    cache = {k: statistics.median(r[k] for r in results) for k in ("cache_build_s", "cache_mib") if k in results[0]}
    return {**cache, "images_per_s": statistics.median(r["images_per_s"] for r in results),
            "all_images_per_s": [r["images_per_s"] for r in results],
            "peak_memory_mb": max((r["peak_memory_mb"] for r in results if r["peak_memory_mb"] is not None),
                                  default=None),
            "gflops_per_image": results[0]["gflops_per_image"], "side_params": results[0]["side_params"]}


def _build(spec: ThroughputSpec, name: str) -> methods.Method:
    torch.manual_seed(0)
    cls = methods.get(name)
    shape = spec.input_shape
    teacher = (models.build(spec.teacher, num_classes=spec.num_classes, in_channels=shape[0])
               if cls.requires_teacher else None)
    student = models.build(spec.student, num_classes=spec.num_classes, in_channels=shape[0])
    return methods.build(name, student, teacher, input_shape=shape, **spec.options.get(name, {}))


def _method_rate(spec: ThroughputSpec, name: str, data: DataSplits, cfg: TrainConfig) -> dict[str, Any]:
    """Images/s of `name`'s training step, its FLOPs, peak CUDA memory (None on CPU), side-module parameters."""
    method = _build(spec, name)
    trainer = Trainer(method, data, cfg, augment=AugmentConfig(), console=Console(quiet=True))
    caching, extra = TeacherCaching(), {}
    if trainer.teacher_cached:  # teacher_views: the cache is built first, as a run's fit does
        started = time.perf_counter()
        caching.on_fit_start(trainer)
        extra = {"cache_build_s": time.perf_counter() - started, "cache_mib": caching.cached.cache.nbytes / 2**20}
    method.train()
    trainer.loader.set_epoch(0)

    def step(batch: Batch) -> None:
        caching.on_batch(trainer, [batch])
        trainer.train_step(batch, 0.0)

    result = _rate(trainer.device, _batches(trainer, spec), spec.warmup, step, count_flops=not cfg.compile)
    caching.on_fit_end(trainer, {})
    return {**result, **extra, "side_params": method.side_parameter_count()}


def _teacher_rate(spec: ThroughputSpec, data: DataSplits, cfg: TrainConfig) -> dict[str, Any]:
    """Images/s of a teacher forward pass under no_grad in eval mode (the methods' teacher_forward)."""
    method = _build(spec, "kd")
    trainer = Trainer(method, data, cfg, augment=AugmentConfig(), console=Console(quiet=True))
    teacher = method.teacher.eval()
    trainer.loader.set_epoch(0)

    def forward(batch: Batch) -> None:
        with torch.no_grad(), trainer.autocast():
            teacher(batch.images)

    return {**_rate(trainer.device, _batches(trainer, spec), spec.warmup, forward, count_flops=True), "side_params": 0}


def _batches(trainer: Trainer, spec: ThroughputSpec) -> list[Batch]:
    """The first warmup + steps batches of the trainer's loader (augmented as in training)."""
    return list(itertools.islice(iter(trainer.loader), spec.warmup + spec.steps))


def _rate(device: torch.device, batches: list[Batch], warmup: int, step: Callable[[Batch], object],
          count_flops: bool) -> dict[str, Any]:
    """Warm up, then time `step` over the remaining batches; FLOPs counted on one extra step (forward and
    backward matmuls and convolutions, as torch.utils.flop_counter counts them; None under torch.compile)."""
    for batch in batches[:warmup]:
        step(batch)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = batches[warmup:]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) // 2**20 if device.type == "cuda" else None
    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step(batches[0])
        flops = counter.get_total_flops() / batches[0].size / 1e9
    return {"images_per_s": sum(b.size for b in timed) / elapsed, "peak_memory_mb": peak,
            "gflops_per_image": flops}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def results_table(result: dict[str, Any]) -> Table:
    spec, bound = result["spec"], result["bound"]
    shape = "x".join(map(str, spec["input_shape"]))
    table = Table(title=f"training throughput: {spec['teacher']} -> {spec['student']}, {shape}, batch {spec['batch']}, "
                        f"{result['environment']['device']}")
    for col in ("method", "img/s", "x bound", "GFLOP/img", "peak MiB", "side params"):
        table.add_column(col, justify="left" if col == "method" else "right")

    def mem(row: dict[str, Any]) -> str:
        return "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:,}"

    def flops(row: dict[str, Any]) -> str:
        return "-" if row["gflops_per_image"] is None else f"{row['gflops_per_image']:.3f}"

    parts = bound["before"]
    bound_flops = (None if parts["student_step"]["gflops_per_image"] is None
                   else parts["student_step"]["gflops_per_image"] + parts["teacher_forward"]["gflops_per_image"])
    table.add_row("bound (student step + teacher fwd)", f"{bound['images_per_s']:,.1f}", "1.00",
                  flops({"gflops_per_image": bound_flops}), "-", "-")
    for part in ("student_step", "teacher_forward", "teacher_forward_folded"):
        if part not in parts:
            continue
        row = parts[part]
        table.add_row(f"  {part.replace('_', ' ')}", f"{row['images_per_s']:,.1f}", "", flops(row), mem(row), "")
    for name, row in result["methods"].items():
        table.add_row(name, f"{row['images_per_s']:,.1f}", f"{row['ratio_to_bound']:.2f}", flops(row), mem(row),
                      f"{row['side_params']:,}")
    folded = " with the teacher's BNs folded (bound: unfolded)" if spec.get("fold_teacher_bn") else ""
    views = spec.get("teacher_views")
    if views:
        built = [f"{n} {r['cache_mib']:,.1f} MiB in {r['cache_build_s']:.1f} s" for n, r in result["methods"].items()
                 if "cache_mib" in r]
        folded += f" from {views} cached teacher views per image (cache: {'; '.join(built) or 'none'})"
    table.caption = (f"methods{folded}; median of {spec['repeats']} x {spec['steps']} steps after "
                     f"{spec['warmup']} warm-up; "
                     f"bound drift during the run {bound['drift']:+.1%}; torch {result['environment']['torch']}, "
                     f"{result['environment']['threads']} threads")
    return table


def default_output(spec: ThroughputSpec) -> Path:
    shape = "x".join(map(str, spec.input_shape))
    extra = (("_compile" if spec.compile else "") + ("" if spec.channels_last else "_nchw")
             + ("_foldbn" if spec.fold_teacher_bn else "") + (f"_views{spec.teacher_views}" if spec.teacher_views
                                                               else ""))
    device = resolve_device(spec.device).type
    return Path("results/throughput") / (f"{spec.teacher}_{spec.student}_{shape}_b{spec.batch}_{device}"
                                         f"_{spec.amp}{extra}.json")
