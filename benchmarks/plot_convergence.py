"""Convergence of a suite's runs: per-epoch test accuracy, test loss and training objective, mean over seeds.

Reads `<output_dir>/<label>_s<seed>/metrics.jsonl` of every entry of a suite file (run the suite first) and
draws one line per entry (mean over seeds, shaded band: +- one standard deviation). Prints the per-epoch mean
test accuracy as a Markdown table. The training objective is each method's own weighted sum of terms, so its
level is not comparable across methods; the test loss (student cross-entropy) is.

    python benchmarks/plot_convergence.py suites/fashion_mnist_kr.yaml --seeds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from distillab.bench.suite import load_suite

PANELS = (("test_acc", "test top-1 accuracy (%)"), ("test_loss", "test cross-entropy"),
          ("loss", "training objective (own terms)"))


def read_curves(suite_path: Path, seeds: int) -> dict[str, dict[str, np.ndarray]]:
    """label -> metric -> array (seeds x epochs)."""
    suite = load_suite(suite_path)
    curves = {}
    for label in suite.runs:
        runs = []
        for seed in range(seeds):
            path = suite.output_dir / f"{label}_s{seed}" / "metrics.jsonl"
            if not path.is_file():
                raise SystemExit(f"{path} is missing: run `distillab bench suite {suite_path} --seeds {seeds}` first")
            runs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        curves[label] = {key: np.array([[r[key] for r in run] for run in runs]) for key, _ in PANELS}
    return curves


def plot(curves: dict[str, dict[str, np.ndarray]], title: str, out: Path) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for ax, (key, ylabel) in zip(axes, PANELS, strict=True):
        for label, metrics in curves.items():
            values = metrics[key]
            epochs = np.arange(1, values.shape[1] + 1)
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            ax.plot(epochs, mean, marker="o", markersize=3, label=label)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def accuracy_table(curves: dict[str, dict[str, np.ndarray]]) -> str:
    epochs = next(iter(curves.values()))["test_acc"].shape[1]
    lines = ["| run | " + " | ".join(f"ep {e}" for e in range(1, epochs + 1)) + " |",
             "|---|" + "---:|" * epochs]
    for label, metrics in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in metrics["test_acc"].mean(0)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="PNG path; default results/<suite name>_convergence.png")
    args = parser.parse_args()
    suite = load_suite(args.suite)
    curves = read_curves(args.suite, args.seeds)
    out = args.out or suite.results_dir / f"{suite.name}_convergence.png"
    plot(curves, f"{suite.name}: mean over {args.seeds} seeds, band +- 1 std", out)
    print(accuracy_table(curves))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
