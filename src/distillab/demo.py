"""`distillab demo`: train a teacher, then distil a small student on scikit-learn's digits (CPU, ~1 min).

Every run goes through the same path as `distillab train`, into `<output_dir>/<run>`; the table
reports last-epoch test accuracy (mean +- std over seeds when there are several).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distillab.config import RunConfig
from distillab.console import make_console
from distillab.engine.run_files import SUMMARY_FILE
from distillab.run import CONFIG_FILE, same_config, train_run

TEACHER = "resnet32"
STUDENT = "resnet8"
STUDENT_METHODS = ("ce", "kd", "fitnet")
COMMON: dict[str, Any] = {
    "data": {"name": "digits", "val_size": 237, "train_subset": 600,
             "augment": {"crop_padding": 1, "flip": False}},
    "train": {"batch_size": 32, "epochs": 15, "optim": {"lr": 0.05}, "schedule": {"name": "cosine"},
              "progress": False},
}


def demo_configs(output_dir: Path, seeds: int = 1) -> tuple[RunConfig, list[RunConfig]]:
    """The teacher's config and the students' (one per method and seed)."""
    teacher = RunConfig.model_validate({
        **COMMON, "name": "teacher", "output_dir": str(output_dir), "student": {"name": TEACHER},
        "method": {"name": "ce"}, "train": {**COMMON["train"], "epochs": 30},
        "data": {**COMMON["data"], "train_subset": None},
    })
    students = [
        RunConfig.model_validate({
            **COMMON, "name": f"{method}_s{seed}", "seed": seed, "output_dir": str(output_dir),
            "student": {"name": STUDENT}, "method": {"name": method},
            "teacher": {"name": TEACHER, "checkpoint": str(teacher.run_dir)},
        })
        for method in STUDENT_METHODS for seed in range(seeds)
    ]
    return teacher, students


def run_demo(output_dir: Path = Path("runs/demo"), seeds: int = 3, console: Console | None = None,
             force: bool = False) -> Table:
    """Run the demo and print its table, with a `[k/N] run` line per run. A finished run of the same config in
    `output_dir` is reused; any other run directory in the way is an error unless `force` (then the demo's runs are
    trained again)."""
    console = console or make_console()
    teacher_cfg, student_cfgs = demo_configs(Path(output_dir), seeds)
    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    runs = [("teacher", teacher_cfg), *((c.method.name, c) for c in student_cfgs)]
    for k, (label, cfg) in enumerate(runs, 1):
        done = cfg.run_dir / SUMMARY_FILE
        step = f"[{k}/{len(runs)}]"
        if not force and done.is_file() and same_config(cfg.run_dir / CONFIG_FILE, cfg):
            summary, how = json.loads(done.read_text()), "reused"
        else:
            with console.status(f"{step} training {cfg.run_name} ({cfg.student.name}, {cfg.method.name})"):
                summary = train_run(cfg, force=force, console=Console(quiet=True))
            how = f"{summary['wall_time_s']:.1f} s"
        console.print(f"{step} {cfg.run_name}: {cfg.student.name} {cfg.method.name}, test {summary['test_acc']:.2f}%, "
                      f"{how}")
        results.setdefault(label, []).append(summary)

    table = Table(title=f"demo: {TEACHER} -> {STUDENT} on digits\nlast-epoch top-1, mean ± std of {seeds} seed(s)")
    for col in ("run", "params", "side", "test %", "val %", "img/s"):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    for label, runs in results.items():
        model = TEACHER if label == "teacher" else STUDENT
        table.add_row(f"{model} {label}", f"{runs[0]['student_params']:,}", f"{runs[0]['side_params']:,}",
                      _mean_std([r["test_acc"] for r in runs]), _mean_std([r["val_acc"] for r in runs]),
                      f"{statistics.mean(r['images_per_s'] for r in runs):,.0f}")
    console.print(table)
    console.print(f"{len(student_cfgs) + 1} runs in {time.perf_counter() - start:.0f} s; "
                  f"run directories under {output_dir}")
    return table


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
