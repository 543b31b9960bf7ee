"""Regenerate every committed figure under results/ from committed files only: no training, no run directories.

FIGURES maps each PNG to the plot function that draws it and the committed file it reads: a suite's results JSON
(`distillab bench suite` writes it) and, for per-epoch curves, the suite's run records (results/runs/<output_dir
name>/<run>/metrics.jsonl, which `bench suite` saves for every finished run). KEPT names the figures whose source
was never committed, and why each is kept anyway.

    python benchmarks/figures.py                    # rewrite every figure of FIGURES (make figures)
    python benchmarks/figures.py --list             # the table: figure, plot function, source
    python benchmarks/figures.py results/fashion_mnist_leaderboard.png --out /tmp/figures   # some, elsewhere
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillab.bench.plots import curves_of, plateau_curves, plot_accuracy, plot_curves, plot_plateau
from distillab.engine.run_files import METRICS_FILE
from distillab.methods.dfa_report import plot_aggregation

ROOT = Path(__file__).resolve().parents[1]
CONVERGED = "results/runs/fashion_mnist_converged"  # records of the suites with output_dir runs/fashion_mnist_converged


@dataclass(frozen=True)
class Figure:
    """A committed PNG, the PLOTS entry that draws it, the committed JSON it reads and the run records it reads
    per-epoch values from (None: it reads none)."""

    png: str
    plot: str
    source: str
    records: str | None = None


FIGURES: tuple[Figure, ...] = (
    # The converged budget's suites: the figures `distillab bench suite <suite> --no-train` writes.
    Figure("results/fashion_mnist_leaderboard.png", "accuracy", "results/fashion_mnist_leaderboard.json"),
    Figure("results/fashion_mnist_leaderboard_curves.png", "curves", "results/fashion_mnist_leaderboard.json",
           CONVERGED),
    Figure("results/fashion_mnist_rdr_converged.png", "accuracy", "results/fashion_mnist_rdr_converged.json"),
    Figure("results/fashion_mnist_rdr_converged_curves.png", "curves", "results/fashion_mnist_rdr_converged.json",
           CONVERGED),
    Figure("results/fashion_mnist_dfa_converged.png", "accuracy", "results/fashion_mnist_dfa_converged.json"),
    Figure("results/fashion_mnist_dfa_converged_curves.png", "curves", "results/fashion_mnist_dfa_converged.json",
           CONVERGED),
    Figure("results/fashion_mnist_unikd_converged.png", "accuracy", "results/fashion_mnist_unikd_converged.json"),
    Figure("results/fashion_mnist_unikd_converged_curves.png", "curves",
           "results/fashion_mnist_unikd_converged.json", CONVERGED),
    Figure("results/fashion_mnist_vit_converged.png", "accuracy", "results/fashion_mnist_vit_converged.json"),
    Figure("results/fashion_mnist_vit_converged_curves.png", "curves", "results/fashion_mnist_vit_converged.json",
           CONVERGED),
    Figure("results/fashion_mnist_controls.png", "accuracy", "results/fashion_mnist_controls.json"),
    Figure("results/fashion_mnist_controls_curves.png", "curves", "results/fashion_mnist_controls.json",
           "results/runs/fashion_mnist_controls"),
    Figure("results/fashion_mnist_unikd_same_cpu.png", "accuracy", "results/fashion_mnist_unikd_same_cpu.json"),
    Figure("results/fashion_mnist_unikd_same_cpu_curves.png", "curves", "results/fashion_mnist_unikd_same_cpu.json",
           "results/runs/fashion_mnist_same_cpu"),
    # The plateau suites (the student alone at several budgets). Their runs predate run records, so the
    # `_epochs` figures have the budget panel only; the per-epoch panel appears once records are committed.
    Figure("results/fashion_mnist_plateau.png", "accuracy", "results/fashion_mnist_plateau.json"),
    Figure("results/fashion_mnist_plateau_epochs.png", "plateau", "results/fashion_mnist_plateau.json", CONVERGED),
    Figure("results/fashion_mnist_plateau_5k.png", "accuracy", "results/fashion_mnist_plateau_5k.json"),
    Figure("results/fashion_mnist_plateau_5k_epochs.png", "plateau", "results/fashion_mnist_plateau_5k.json",
           CONVERGED),
    Figure("results/fashion_mnist_plateau_noaug.png", "accuracy", "results/fashion_mnist_plateau_noaug.json"),
    Figure("results/fashion_mnist_plateau_noaug_epochs.png", "plateau", "results/fashion_mnist_plateau_noaug.json",
           CONVERGED),
    # Leaderboard v2's plateau (the student alone on 5,000 images as 8 views), with its run records.
    Figure("results/fashion_mnist_v2_plateau.png", "accuracy", "results/fashion_mnist_v2_plateau.json"),
    Figure("results/fashion_mnist_v2_plateau_curves.png", "curves", "results/fashion_mnist_v2_plateau.json",
           "results/runs/fashion_mnist_v2"),
    Figure("results/fashion_mnist_v2_plateau_epochs.png", "plateau", "results/fashion_mnist_v2_plateau.json",
           "results/runs/fashion_mnist_v2"),
    # The earlier 6-epoch, 3-seed suites (results/fashion_mnist_short_budget.md): their JSONs only, no run
    # records, so no per-epoch curves; file names as their .md files link them.
    Figure("results/fashion_mnist_all_accuracy.png", "accuracy", "results/fashion_mnist_all.json"),
    Figure("results/fashion_mnist_baselines_accuracy.png", "accuracy", "results/fashion_mnist_baselines.json"),
    Figure("results/fashion_mnist_dfa_accuracy.png", "accuracy", "results/fashion_mnist_dfa.json"),
    Figure("results/fashion_mnist_diffkd_accuracy.png", "accuracy", "results/fashion_mnist_diffkd.json"),
    Figure("results/fashion_mnist_foundation_accuracy.png", "accuracy", "results/fashion_mnist_foundation.json"),
    Figure("results/fashion_mnist_kr_accuracy.png", "accuracy", "results/fashion_mnist_kr.json"),
    Figure("results/fashion_mnist_rdr_accuracy.png", "accuracy", "results/fashion_mnist_rdr.json"),
    Figure("results/fashion_mnist_unikd_accuracy.png", "accuracy", "results/fashion_mnist_unikd.json"),
    # DFA's searched weights on the 6-epoch budget (the search record the dfa method writes, aggregation.json).
    Figure("results/fashion_mnist_dfa_search.png", "dfa_weights", "results/fashion_mnist_dfa_search.json"),
    Figure("results/fashion_mnist_dfa_search_long.png", "dfa_weights", "results/fashion_mnist_dfa_search_long.json"),
)

_DYNAMICS = ("per-step gradients of a DFA search rerun with train.log_steps=true: its steps.jsonl was not committed, "
             "and docs/methods/dfa.md reads the search's behaviour from this figure. Remake it (the search stage "
             "takes under a minute): distillab train configs/fashion_mnist/dfa_searched.yaml --budget "
             "configs/fashion_mnist/_converged.yaml --set seed=0 --set train.log_steps=true{extra}, then copy "
             "RUN/stages/search/search_dynamics.png")
KEPT: dict[str, str] = {
    "results/fashion_mnist_dfa_converged_dynamics_searched.png": _DYNAMICS.format(extra=""),
    "results/fashion_mnist_dfa_converged_dynamics_student_ce.png": _DYNAMICS.format(
        extra=" --set method.options.search.add_student_ce=true"),
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def draw_accuracy(figure: Figure, root: Path, out: Path) -> Path:
    """Bars of a suite's last-epoch test accuracy (and its paired differences), as `bench suite` draws them."""
    return plot_accuracy(_read_json(root / figure.source), out)


def draw_curves(figure: Figure, root: Path, out: Path) -> Path:
    """A suite's per-epoch curves from the records of every (label, seed) its JSON counts; a missing record is an
    error, since the figure would silently leave out a seed."""
    results = _read_json(root / figure.source)
    runs = {label: [root / figure.records / f"{label}_s{seed}" for seed in row["seeds"]]
            for label, row in results["runs"].items()}
    missing = [str(d) for dirs in runs.values() for d in dirs if not (d / METRICS_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{figure.png}: no committed record for " + ", ".join(missing))
    return plot_curves(curves_of(runs), f"{results['suite']}: mean over seeds, band +- 1 std", out)


def draw_plateau(figure: Figure, root: Path, out: Path) -> Path:
    """benchmarks/plateau.py's figure: accuracy against the epoch budget, and per-epoch curves where recorded."""
    results = _read_json(root / figure.source)
    return plot_plateau(results, plateau_curves(results, root / figure.records) if figure.records else {}, out)


def draw_dfa_weights(figure: Figure, root: Path, out: Path) -> Path:
    """The heat-map of a DFA search's weights, as the search stage draws it (aggregation.png)."""
    record = _read_json(root / figure.source)
    plot_aggregation(out, [group["weights"] for group in record["groups"]],
                     f"DFA weights: {record['teacher']} -> {record['student']} on {record['dataset']}")
    return out


PLOTS: dict[str, Callable[[Figure, Path, Path], Path]] = {
    "accuracy": draw_accuracy, "curves": draw_curves, "plateau": draw_plateau, "dfa_weights": draw_dfa_weights}


def unlisted(root: Path = ROOT) -> list[str]:
    """PNGs under results/ that are neither in FIGURES nor in KEPT: no command would remake them."""
    listed = {f.png for f in FIGURES} | set(KEPT)
    return sorted(p for p in (str(q.relative_to(root)) for q in (root / "results").rglob("*.png")) if p not in listed)


def draw(figure: Figure, root: Path = ROOT, out_dir: Path | None = None) -> Path:
    """Write `figure` (to its own path, or into `out_dir` under its file name)."""
    out = (out_dir / Path(figure.png).name) if out_dir else root / figure.png
    out.parent.mkdir(parents=True, exist_ok=True)
    return PLOTS[figure.plot](figure, root, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="*", help="only these PNGs (paths as in FIGURES)")
    parser.add_argument("--out", type=Path, help="write into this folder instead of over the committed figures")
    parser.add_argument("--list", action="store_true", help="print the table and write nothing")
    args = parser.parse_args()
    known = {f.png: f for f in FIGURES}
    unknown = [p for p in args.figures if p not in known]
    if unknown:
        parser.error("not in FIGURES: " + ", ".join(unknown))
    chosen = [known[p] for p in args.figures] or list(FIGURES)
    for figure in chosen:
        source = figure.source + (f" + {figure.records}/<run>/{METRICS_FILE}" if figure.records else "")
        if args.list:
            print(f"{figure.png}  [{figure.plot}]  <- {source}")
        else:
            print(f"wrote {draw(figure, out_dir=args.out)}  [{figure.plot}]  <- {source}")
    for png, why in KEPT.items():
        print(f"kept, not regenerated: {png}: {why}")
    for png in unlisted():
        print(f"warning: {png} is in neither FIGURES nor KEPT")


if __name__ == "__main__":
    main()
