"""From a validated RunConfig (method dfa) to a search run directory: config.yaml, aggregation.json/.png.

The search reads the config's data, seed, teacher, student, `train.batch_size`, `train.device` and
`train.progress`, and `method.options.search`; the rest of `train` (the stage-2 recipe) is not used.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import distillab
from distillab.config import RunConfig, dump_config
from distillab.data import load_splits
from distillab.engine.trainer import device_name, resolve_device
from distillab.errors import ConfigError
from distillab.methods.base import validate_options
from distillab.methods.dfa import DFA
from distillab.run import CONFIG_FILE, build_models, check_run_dir, claim_run_dir
from distillab.search.dfa import BridgeSearch, run_search
from distillab.search.report import HEATMAP_FILE, plot_aggregation, write_aggregation


def search_dir(cfg: RunConfig) -> Path:
    """The search's run directory: `name`, else dfa_search_<student>_<data>_s<seed>, under `output_dir`."""
    return cfg.output_dir / (cfg.name or f"dfa_search_{cfg.student.name}_{cfg.data.name}_s{cfg.seed}")


def search_run(cfg: RunConfig, *, force: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Search the aggregation weights of `cfg` into its run directory; returns the aggregation record."""
    if cfg.method.name != "dfa":
        raise ConfigError(f"method.name: {cfg.method.name!r} has no search stage (`distillab search` runs DFA's: "
                          "method.name: dfa)")
    console = console or Console()
    opts = validate_options(DFA, cfg.method.options)
    run_dir = search_dir(cfg)
    check_run_dir(run_dir, resume=False, force=force)
    data = load_splits(cfg.data)
    teacher, student, info = build_models(cfg, data)
    searcher = BridgeSearch(student, teacher, opts.search, data.image_shape)
    device = resolve_device(cfg.train.device)
    with claim_run_dir(run_dir, force):  # the run lock, held until the search is written
        (run_dir / CONFIG_FILE).write_text(dump_config(cfg))
        console.print(f"[bold]{run_dir.name}[/]: dfa search {cfg.teacher.name} -> {cfg.student.name} on "
                      f"{cfg.data.name} ({len(data.train)} train images, halves of {len(data.train) // 2}); "
                      f"candidates per group {searcher.groups.sizes}")
        started = time.perf_counter()
        groups = run_search(searcher, data.train, batch_size=cfg.train.batch_size, seed=cfg.seed, device=device,
                            augment=cfg.data.augment, console=console, progress=cfg.train.progress)
        wall = time.perf_counter() - started
        record = {
            **info,
            "run": run_dir.name,
            "method": "dfa",
            "stage": "search",
            "seed": cfg.seed,
            "train_images": len(data.train),
            "batch_size": cfg.train.batch_size,
            "steps_per_group": groups[0].steps,
            "search_wall_time_s": wall,
            "search_options": opts.search.model_dump(mode="json"),
            "groups": [dataclasses.asdict(g) for g in groups],
            "environment": {"torch": torch.__version__, "distillab": distillab.__version__,
                            "device": device_name(device), "threads": torch.get_num_threads(),
                            "python": platform.python_version()},
        }
        write_aggregation(run_dir, record)
        plot_aggregation(run_dir / HEATMAP_FILE, [g.weights for g in groups],
                         f"DFA weights: {cfg.teacher.name} -> {cfg.student.name} on {cfg.data.name}")
        return record
