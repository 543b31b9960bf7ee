"""What a DFA search leaves in its run directory: aggregation.json and the aggregation.png heat-map."""

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
