"""What a DFA search leaves in its run directory: aggregation.json and the aggregation.png heat-map (written by
the `dfa_search` method, the first stage of `dfa`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distillab.engine.checkpoint import atomic_write
from distillab.methods.dfa import AGGREGATION_FILE

HEATMAP_FILE = "aggregation.png"


def write_aggregation(run_dir: Path, record: dict[str, Any]) -> Path:
    """The record (its "groups" hold each group's candidate names, beta and weights) as JSON, written atomically."""
    path = Path(run_dir) / AGGREGATION_FILE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return path


def plot_aggregation(path: Path, weights: list[list[float]], title: str) -> None:
    """A heat-map of the weights: one row per group, one column per candidate block (blank where there is none)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    width = max(len(w) for w in weights)
    grid = np.full((len(weights), width), np.nan)
    for i, row in enumerate(weights):
        grid[i, : len(row)] = row
    fig = Figure(figsize=(1.2 + 0.9 * width, 1.0 + 0.7 * len(weights)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xticks(range(width), [str(j) for j in range(width)])
    ax.set_yticks(range(len(weights)), [f"group {i}" for i in range(len(weights))])
    ax.set_xlabel("candidate j (names in aggregation.json)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="alpha")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


DYNAMICS_FILE = "search_dynamics.png"


def plot_search_dynamics(run_dir: Path, path: Path) -> Path | None:
    """Per group, each path's gradient on each beta_j (TS solid, ST dashed; a negative gradient raises alpha_j)
    and alpha_j, over the search's steps (steps.jsonl, written with train.log_steps) or else its epochs
    (metrics.jsonl). None when the run logged no search values."""
    from matplotlib.figure import Figure

    source = Path(run_dir) / ("steps.jsonl" if (Path(run_dir) / "steps.jsonl").is_file() else "metrics.jsonl")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()] if source.is_file() else []
    prefix = "" if source.name == "steps.jsonl" else "log_"
    groups = sorted({int(k[len(prefix) + 1:].split("_")[0]) for r in records for k in r
                     if k.startswith(f"{prefix}g") and "_alpha_" in k})
    if not groups:
        return None
    fig = Figure(figsize=(4.2 * len(groups), 6.0), layout="constrained")
    axes = fig.subplots(2, len(groups), squeeze=False)
    for col, g in enumerate(groups):
        rows = [r for r in records if f"{prefix}g{g}_alpha_0" in r]
        x = np.arange(len(rows)) + (1 if prefix else 0)  # steps from 0, epochs of the group from 1
        ts_dot, st_dot = ("o", "x") if prefix else ("", "")  # per-epoch means: few points (one pass per group: one)
        candidates = sorted({int(k.rsplit("_", 1)[1]) for r in rows for k in r if k.startswith(f"{prefix}g{g}_alpha_")})
        for j in candidates:
            line, = axes[0, col].plot(x, [r[f"{prefix}g{g}_ts_grad_{j}"] for r in rows], f"{ts_dot}-",
                                     label=f"TS, block {j}")
            axes[0, col].plot(x, [r[f"{prefix}g{g}_st_grad_{j}"] for r in rows], f"{st_dot}--", color=line.get_color(),
                              label=f"ST, block {j}")
            axes[1, col].plot(x, [r[f"{prefix}g{g}_alpha_{j}"] for r in rows], f"{ts_dot}-", color=line.get_color(),
                              label=f"block {j}")
        axes[0, col].axhline(0.0, color="grey", lw=0.5)
        axes[0, col].set_title(f"group {g}: gradient on beta", fontsize=9)
        axes[1, col].set_title(f"group {g}: alpha", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xlabel("step" if prefix == "" else "epoch")
            ax.legend(fontsize=7)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return Path(path)
