"""Where the student alone stops climbing: final validation accuracy against the epoch budget.

Reads a suite whose entries are one config trained for different numbers of epochs (each with its own cosine
schedule), labelled `<anything>_e<epochs>` (suites/fashion_mnist_plateau.yaml), and draws two panels: the
last-epoch validation (and test) accuracy of every seed against the budget, and the per-epoch validation curve
of each budget. It prints each budget's gap to the longest one, the plateau estimate.

    distillab bench suite suites/fashion_mnist_plateau.yaml --seeds 2
    python benchmarks/plateau.py results/fashion_mnist_plateau.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from distillab.engine.trainer import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the suite's results JSON")
    parser.add_argument("--runs", type=Path, default=Path("runs/fashion_mnist_converged"),
                        help="the suite's output_dir (for the per-epoch curves)")
    parser.add_argument("--out", type=Path, help="PNG (default: <results stem>_epochs.png)")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    budgets = sorted(((int(re.search(r"_e(\d+)$", label).group(1)), label, row)
                      for label, row in results["runs"].items()), key=lambda b: b[0])
    longest = statistics.mean(v for v in budgets[-1][2]["per_seed_val_acc"])
    table = Table(title=f"{results['suite']}: last-epoch accuracy against the budget")
    for col in ("epochs", "seeds", "val % per seed", "val % mean", "gap to longest", "test % mean"):
        table.add_column(col, justify="right")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for epochs, label, row in budgets:
        val = row["per_seed_val_acc"]
        table.add_row(str(epochs), str(len(val)), " ".join(f"{v:.2f}" for v in val), f"{statistics.mean(val):.2f}",
                      f"{statistics.mean(val) - longest:+.2f}", f"{row['test_acc']['mean']:.2f}")
        left.plot([epochs] * len(val), val, "o", color="tab:blue", alpha=0.5)
        left.plot([epochs] * len(val), row["per_seed_test_acc"], "x", color="tab:orange", alpha=0.5)
        curves = [[r["val_acc"] for r in read_metrics(args.runs / f"{label}_s{s}") if "val_acc" in r]
                  for s in row["seeds"]]
        curves = [c for c in curves if c]
        if curves:
            n = min(len(c) for c in curves)
            right.plot(range(1, n + 1), [statistics.mean(c[i] for c in curves) for i in range(n)], label=label)
    xs = [b[0] for b in budgets]
    left.plot(xs, [statistics.mean(b[2]["per_seed_val_acc"]) for b in budgets], "-", color="tab:blue",
              label="validation (mean; dots: seeds)")
    left.plot(xs, [b[2]["test_acc"]["mean"] for b in budgets], "--", color="tab:orange", label="test (mean)")
    left.axhspan(longest - 0.5, longest, color="tab:green", alpha=0.15, label="within 0.5 of the longest")
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("epochs (each its own cosine schedule)")
    left.set_ylabel("last-epoch top-1 %")
    left.set_title(f"{results['suite']}: accuracy against the budget")
    left.legend(fontsize="small")
    left.grid(alpha=0.3)
    right.set_xlabel("epoch")
    right.set_ylabel("validation top-1 % (mean over seeds)")
    right.set_ylim(longest - 6, longest + 1.5)
    right.set_title("per-epoch validation accuracy of each budget")
    right.legend(fontsize="small")
    right.grid(alpha=0.3)
    out = args.out or args.results.with_name(f"{args.results.stem}_epochs.png")
    fig.savefig(out, dpi=110)
    Console().print(table)
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
