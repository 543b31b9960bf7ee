"""Where the student alone stops climbing: final validation accuracy against the epoch budget.

Reads a suite whose entries are one config trained for different numbers of epochs (each with its own cosine
schedule; suites/fashion_mnist_plateau.yaml) and draws the last-epoch validation (and test) accuracy of every seed
against the budget; beside it, when the runs' per-epoch records are at hand (the suite's committed records by
default, or --runs), each budget's validation accuracy at the epochs where it was evaluated (train.eval_every).
It prints each budget's gap to the longest one, the plateau estimate.

    distillab bench suite suites/fashion_mnist_plateau.yaml --seeds 2
    python benchmarks/plateau.py results/fashion_mnist_plateau.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distillab.bench.plots import plateau_curves, plot_plateau
from distillab.bench.suite import load_suite, records_dir


def budget_table(results: dict) -> Table:
    """Each budget's last-epoch validation accuracy per seed, its mean, its gap to the longest and its test mean."""
    budgets = sorted(results["runs"].items(), key=lambda item: item[1]["epochs"])
    longest = statistics.mean(budgets[-1][1]["per_seed_val_acc"])
    table = Table(title=f"{results['suite']}: last-epoch accuracy against the budget")
    for col in ("epochs", "seeds", "val % per seed", "val % mean", "gap to longest", "test % mean"):
        table.add_column(col, justify="right")
    for _, row in budgets:
        val = row["per_seed_val_acc"]
        table.add_row(str(row["epochs"]), str(len(val)), " ".join(f"{v:.2f}" for v in val),
                      f"{statistics.mean(val):.2f}", f"{statistics.mean(val) - longest:+.2f}",
                      f"{row['test_acc']['mean']:.2f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the suite's results JSON")
    parser.add_argument("--runs", type=Path, help="where the runs' metrics.jsonl are: the suite's output_dir, or its "
                        "records (default: the records of suites/<suite>.yaml, results/runs/<output_dir name>)")
    parser.add_argument("--out", type=Path, help="PNG (default: <results stem>_epochs.png)")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    suite_file = Path("suites") / f"{results['suite']}.yaml"
    runs = args.runs or (records_dir(load_suite(suite_file)) if suite_file.is_file() else None)
    curves = plateau_curves(results, runs) if runs is not None else {}
    out = plot_plateau(results, curves, args.out or args.results.with_name(f"{args.results.stem}_epochs.png"))
    console = Console()
    console.print(budget_table(results))
    if not curves:
        console.print(f"no per-epoch records of these runs in {runs}: the figure has the budget panel only")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
