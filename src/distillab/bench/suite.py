"""Multi-seed comparisons: run each entry of a suite for N seeds, aggregate last-epoch accuracy.

A suite file names the runs to compare, each a config file plus overrides:

    name: fashion_mnist_kd              # results/<name>.json and results/<name>.md
    output_dir: runs/fashion_mnist      # run directories: <output_dir>/<label>_s<seed>
    runs:
      ce: {config: configs/fashion_mnist/ce.yaml}
      kd: {config: configs/fashion_mnist/kd.yaml, set: [method.options.temperature=2]}

Finished runs (those with a summary.json) are skipped, so an interrupted suite resumes where it stopped,
and suites sharing an output directory share the runs they have in common (same label, same config); a
label whose existing run was made from a different config is an error.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError
from rich.console import Console
from rich.table import Table

from distillab.bench.plots import curves_of, plot_accuracy, plot_curves
from distillab.config import RunConfig, StrictModel, dump_config, format_validation_error, load_config
from distillab.engine.trainer import SUMMARY_FILE
from distillab.errors import ConfigError
from distillab.run import CONFIG_FILE, train_run


class SuiteEntry(StrictModel):
    config: Path
    set: list[str] = Field(default_factory=list, description="overrides, as with --set")


class Suite(StrictModel):
    name: str
    output_dir: Path = Path("runs/suites")
    results_dir: Path = Path("results")
    runs: dict[str, SuiteEntry]


def load_suite(path: Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {path} does not exist")
    try:
        suite = Suite.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, Suite, f"{path}: ")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return suite


def run_suite(suite: Suite, seeds: int, console: Console | None = None) -> dict[str, Any]:
    """Train every (entry, seed) not finished yet, then write and return the aggregate."""
    console = console or Console()
    configs = {
        (label, seed): load_config(entry.config, [*entry.set, f"seed={seed}",
                                                  f"output_dir={suite.output_dir}",
                                                  f"name={label}_s{seed}"])
        for label, entry in suite.runs.items() for seed in range(seeds)
    }  # all validated before the first run starts
    for cfg in configs.values():
        saved = cfg.run_dir / CONFIG_FILE
        if saved.is_file() and not _same_config(saved, cfg):
            raise ConfigError(f"{cfg.run_dir} exists but was made from another config than the suite's entry "
                              f"{cfg.run_name!r}: rename the entry or move the run")
    todo = [key for key, cfg in configs.items() if not (cfg.run_dir / SUMMARY_FILE).is_file()]
    if len(todo) < len(configs):
        console.print(f"{len(configs) - len(todo)} of {len(configs)} runs already finished: "
                      + ", ".join(configs[k].run_name for k in configs if k not in todo))
    started, durations = time.perf_counter(), []
    for i, key in enumerate(todo, 1):
        cfg = configs[key]
        eta = (f", about {_minutes(statistics.mean(durations) * (len(todo) - i + 1))} left" if durations else "")
        console.rule(f"[{i}/{len(todo)}] {key[0]}, seed {key[1]} ({_minutes(time.perf_counter() - started)} "
                     f"elapsed{eta})")
        resume = cfg.run_dir.is_dir() and any(cfg.run_dir.iterdir())
        run_start = time.perf_counter()
        train_run(cfg, resume=resume, console=console)
        durations.append(time.perf_counter() - run_start)
    results = aggregate(suite, {k: json.loads((c.run_dir / SUMMARY_FILE).read_text()) for k, c in configs.items()})
    run_dirs = {label: [c.run_dir for (lab, _), c in configs.items() if lab == label] for label in suite.runs}
    write_results(suite, results, run_dirs, seeds)
    console.print(results_table(results))
    return results


def _same_config(saved: Path, cfg: RunConfig) -> bool:
    """Whether a run's saved config describes `cfg`, read with today's defaults (so that a field added to
    the schema after the run was made does not count as a difference)."""
    try:
        return dump_config(load_config(saved)) == dump_config(cfg)
    except ConfigError:
        return False


def aggregate(suite: Suite, summaries: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    rows = {}
    for label in suite.runs:
        runs = [s for (lab, _), s in sorted(summaries.items()) if lab == label]
        rows[label] = {
            "config": str(suite.runs[label].config),
            "overrides": suite.runs[label].set,
            "seeds": [r["seed"] for r in runs],
            "test_acc": _stats([r["test_acc"] for r in runs]),
            "val_acc": _stats([r["val_acc"] for r in runs if r.get("val_acc") is not None]),
            "best_epoch_test_acc": _stats([r["best_epoch_test_acc"] for r in runs]),
            "images_per_s": statistics.mean(r["images_per_s"] for r in runs),
            "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
            "epochs": runs[0]["epochs"],
            "teacher": runs[0].get("teacher"),
            "teacher_test_acc": runs[0].get("teacher_test_acc"),
            "teacher_sha256": runs[0].get("teacher_sha256"),
            "student": runs[0]["student"],
            "per_seed_test_acc": [r["test_acc"] for r in runs],
        }
    first = next(iter(summaries.values()))
    return {"suite": suite.name, "dataset": first["dataset"], "environment": first["environment"], "runs": rows}


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _fmt(stats: dict[str, float] | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def results_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"{results['suite']}: last-epoch accuracy, mean ± std over seeds")
    for col in ("run", "student", "seeds", "test top-1 %", "val top-1 %", "img/s"):
        table.add_column(col, justify="left" if col in ("run", "student") else "right")
    for label, r in results["runs"].items():
        table.add_row(label, r["student"], str(len(r["seeds"])), _fmt(r["test_acc"]), _fmt(r["val_acc"]),
                      f"{r['images_per_s']:,.0f}")
    return table


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def write_results(suite: Suite, results: dict[str, Any], run_dirs: dict[str, list[Path]], seeds: int) -> None:
    """results/<name>.json, <name>.md, and the figures <name>_accuracy.png and <name>_curves.png."""
    suite.results_dir.mkdir(parents=True, exist_ok=True)
    (suite.results_dir / f"{suite.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    accuracy = plot_accuracy(results, suite.results_dir / f"{suite.name}_accuracy.png")
    curves = plot_curves(curves_of(run_dirs), f"{suite.name}: mean over {seeds} seeds, band +- 1 std",
                         suite.results_dir / f"{suite.name}_curves.png")
    env = results["environment"]
    lines = [
        f"# {suite.name}",
        "",
        f"Dataset {results['dataset']}; last-epoch test accuracy (validation accuracy beside it), mean ± std "
        f"over seeds; best-epoch test accuracy only for comparison with published tables. "
        f"torch {env['torch']}, {env['device']}, {env['threads']} threads.",
        "",
        "| run | teacher -> student | seeds | test top-1 % | val top-1 % | best-epoch test % | img/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in results["runs"].items():
        pair = f"{r['teacher']} -> {r['student']}" if r["teacher"] else r["student"]
        lines.append(f"| {label} | {pair} | {len(r['seeds'])} | {_fmt(r['test_acc'])} | {_fmt(r['val_acc'])} | "
                     f"{_fmt(r['best_epoch_test_acc'])} | {r['images_per_s']:,.0f} |")
    lines += ["", f"![accuracy]({accuracy.name})", "", f"![curves]({curves.name})"]
    (suite.results_dir / f"{suite.name}.md").write_text("\n".join(lines) + "\n")
