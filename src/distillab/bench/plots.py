"""PNG figures of runs: final accuracy with error bars, and per-epoch curves (mean over seeds, +- 1 std band)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from distillab.engine.checkpoint import atomic_write, describe_write_failure
from distillab.engine.run_files import read_metrics
from distillab.errors import DistillabError

CURVE_PANELS = (("test_acc", "test top-1 accuracy (%)"), ("test_loss", "test cross-entropy"),
                ("loss", "training objective (each method's own terms)"))


def curves_of(runs: dict[str, list[Path]]) -> dict[str, dict[str, np.ndarray]]:
    """label -> metric -> array (runs x epochs), over the epochs every run of the label has finished."""
    curves = {}
    for label, dirs in runs.items():
        records = [r for r in (read_metrics(d) for d in dirs) if r]
        if not records:
            continue
        epochs = min(len(r) for r in records)
        curves[label] = {key: np.array([[rec.get(key, np.nan) for rec in r[:epochs]] for r in records], dtype=float)
                         for key, _ in CURVE_PANELS}
    return curves


def line_styles(count: int) -> list[dict[str, Any]]:
    """A distinct colour (and past 10 lines, alternating dash) for each of `count` lines: tab10 repeats after 10."""
    if count <= 10:
        return [{"color": plt.get_cmap("tab10")(i)} for i in range(count)]
    colours = plt.get_cmap("tab20")
    return [{"color": colours(i % 20), "linestyle": "-" if i < 20 else "--"} for i in range(count)]


def plot_curves(curves: dict[str, dict[str, np.ndarray]], title: str, out: Path) -> Path:
    """One panel per metric of CURVE_PANELS, one line per label (mean over its runs, band +- 1 std)."""
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(5.2 * len(CURVE_PANELS), 4.2), constrained_layout=True)
    styles = dict(zip(curves, line_styles(len(curves)), strict=True))
    for ax, (key, ylabel) in zip(axes, CURVE_PANELS, strict=True):
        for label, metrics in curves.items():
            values = metrics[key]
            epochs = np.arange(1, values.shape[1] + 1)
            measured = ~np.isnan(values).any(0)  # epochs without an evaluation (train.eval_every) are skipped
            values, epochs = values[:, measured], epochs[measured]
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            ax.plot(epochs, mean, marker="o", markersize=3, label=label, **styles[label])
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.15, color=styles[label]["color"])
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if key == "loss":  # methods' objectives differ by orders of magnitude
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", ncol=2 if len(curves) > 8 else 1)
    fig.suptitle(title)
    return _save(fig, out)


def plot_accuracy(results: dict[str, Any], out: Path) -> Path:
    """Horizontal bars of last-epoch test accuracy, mean +- std over seeds, with each seed as a dot; beside them,
    when the suite has a reference, each run's paired difference to it with its 95 % confidence interval."""
    rows = results["runs"]
    labels = list(rows)
    ref = results.get("reference")
    diffs = {k: rows[k].get("vs_reference") for k in labels}
    panels = 2 if ref and any(diffs.values()) else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 0.45 * len(labels) + 1.6), constrained_layout=True,
                             squeeze=False)
    ax = axes[0][0]
    means = [rows[k]["test_acc"]["mean"] for k in labels]
    stds = [rows[k]["test_acc"]["std"] for k in labels]
    y = np.arange(len(labels))[::-1]
    ax.barh(y, means, xerr=stds, color="tab:blue", alpha=0.6, capsize=3)
    for yi, k in zip(y, labels, strict=True):
        seeds = rows[k]["per_seed_test_acc"]
        ax.plot(seeds, [yi] * len(seeds), "k.", markersize=4)
        right = max(*seeds, rows[k]["test_acc"]["mean"] + rows[k]["test_acc"]["std"])
        ax.text(right + 0.15, yi, f"{rows[k]['test_acc']['mean']:.2f}", va="center", fontsize="small")
    teachers = teacher_lines(rows)
    for (name, acc), style in zip(teachers.items(), ("--", ":", "-.", (0, (5, 1))) * 4, strict=False):
        ax.axvline(acc, color="tab:red", linestyle=style, label=f"teacher {name} {acc:.2f}")
    if teachers:
        ax.legend(loc="lower right", fontsize="small")
    teacher = max(teachers.values(), default=None)
    ax.set_yticks(y, labels)
    lo = min(min(rows[k]["per_seed_test_acc"]) for k in labels)
    hi = max([max(rows[k]["per_seed_test_acc"]) for k in labels] + [teacher or 0])
    ax.set_xlim(lo - 1.0, hi + 1.5)
    ax.set_xlabel("last-epoch test top-1 accuracy (%), mean +- std; dots: seeds")
    ax.set_title(f"{results['suite']} ({results['dataset']})")
    ax.grid(axis="x", alpha=0.3)
    if panels == 2:
        _plot_paired(axes[0][1], y, labels, diffs, ref)
        axes[0][1].set_ylim(ax.get_ylim())  # each run's row at the same height in both panels
    return _save(fig, out)


def teacher_lines(rows: dict[str, Any]) -> dict[str, float]:
    """One entry per distinct teacher of the runs (by name and weights): its label -> test accuracy."""
    seen: dict[tuple, float] = {}
    for r in rows.values():
        if r.get("teacher_test_acc") is not None:
            seen.setdefault((r.get("teacher"), r.get("teacher_sha256")), r["teacher_test_acc"])
    names = [name for name, _ in seen]
    return {(name if names.count(name) == 1 else f"{name} {sha[:8]}"): acc for (name, sha), acc in seen.items()}


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "tie": "tab:gray", "one seed": "tab:gray"}


def _plot_paired(ax, y: np.ndarray, labels: list[str], diffs: dict[str, Any], ref: str) -> None:
    """Paired differences to the reference: mean and 95 % CI per run, coloured by verdict, seeds as dots."""
    from distillab.bench.stats import verdict

    for yi, k in zip(y, labels, strict=True):
        d = diffs[k]
        if d is None:
            ax.text(0, yi, "reference" if k == ref else "no common seeds", va="center", ha="center",
                    fontsize="small", bbox={"facecolor": "white", "edgecolor": "none"})  # over the zero line
            continue
        colour = VERDICT_COLOURS[verdict(d)]
        if d["ci_low"] is not None:
            ax.errorbar(d["mean"], yi, xerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o",
                        color=colour, capsize=4)
        else:
            ax.plot(d["mean"], yi, "o", color=colour)
        ax.plot(d["per_seed"], [yi] * len(d["per_seed"]), ".", color="k", markersize=3, alpha=0.6)
    ax.axvline(0, color="k", linewidth=1)
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"test accuracy minus {ref}'s, same seed (points); mean and 95 % CI")
    ax.set_title(f"paired by seed against {ref}: green better, red worse, grey tie")
    ax.grid(axis="x", alpha=0.3)


def evaluated(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The epochs at which `key` was measured, as the records number them (with `train.eval_every: 5` over 12
    epochs: 5, 10, 12), and its values there."""
    pairs = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [epoch for epoch, _ in pairs], [value for _, value in pairs]


def mean_curve(runs: list[list[dict[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs at which every run measured `key`, and its mean over the runs there (empty arrays without runs)."""
    measured = [dict(zip(*evaluated(records, key), strict=True)) for records in runs]
    common = sorted(set.intersection(*(set(m) for m in measured))) if measured else []
    return (np.array(common, dtype=int),
            np.array([np.mean([m[epoch] for m in measured]) for epoch in common], dtype=float))


def plateau_curves(results: dict[str, Any], runs_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (epochs, validation accuracy, mean over seeds) of a plateau suite, read from `runs_dir`, a suite's
    output directory or its records (`<label>_s<seed>/metrics.jsonl`); labels with no seed there are left out."""
    curves = {}
    for label, row in results["runs"].items():
        runs = [r for r in (read_metrics(Path(runs_dir) / f"{label}_s{seed}") for seed in row["seeds"]) if r]
        epochs, values = mean_curve(runs, "val_acc")
        if epochs.size:
            curves[label] = (epochs, values)
    return curves


def plot_plateau(results: dict[str, Any], curves: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """Last-epoch validation (and test) accuracy of every seed against the epoch budget of each entry (each its own
    cosine schedule); beside it, when `curves` (plateau_curves) has any, each budget's validation accuracy at the
    epochs where it was evaluated."""
    budgets = sorted(results["runs"].items(), key=lambda item: item[1]["epochs"])
    longest = float(np.mean(budgets[-1][1]["per_seed_val_acc"]))
    panels = 2 if curves else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True, squeeze=False)
    left = axes[0][0]
    xs = [row["epochs"] for _, row in budgets]
    for epochs, (_, row) in zip(xs, budgets, strict=True):
        left.plot([epochs] * len(row["per_seed_val_acc"]), row["per_seed_val_acc"], "o", color="tab:blue", alpha=0.5)
        left.plot([epochs] * len(row["per_seed_test_acc"]), row["per_seed_test_acc"], "x", color="tab:orange",
                  alpha=0.5)
    left.plot(xs, [np.mean(row["per_seed_val_acc"]) for _, row in budgets], "-", color="tab:blue",
              label="validation (mean; dots: seeds)")
    left.plot(xs, [row["test_acc"]["mean"] for _, row in budgets], "--", color="tab:orange", label="test (mean)")
    left.axhspan(longest - 0.5, longest, color="tab:green", alpha=0.15, label="within 0.5 of the longest")
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.minorticks_off()
    left.set_xlabel("epochs (each its own cosine schedule)")
    left.set_ylabel("last-epoch top-1 %")
    left.set_title(f"{results['suite']}: accuracy against the budget")
    left.legend(fontsize="small")
    left.grid(alpha=0.3)
    if curves:
        right = axes[0][1]
        for label, (epochs, values) in curves.items():
            right.plot(epochs, values, marker="o", markersize=3, label=label)
        right.set_xlabel("epoch (where evaluated)")
        right.set_ylabel("validation top-1 % (mean over seeds)")
        right.set_ylim(longest - 6, longest + 1.5)
        right.set_title("validation accuracy of each budget over its epochs")
        right.legend(fontsize="small")
        right.grid(alpha=0.3)
    return _save(fig, out)


PNG_SOFTWARE = "distillab"  # the PNG's Software text: marks a figure distillab may replace


def _save(fig, out: Path) -> Path:
    out = Path(out)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata={"Software": PNG_SOFTWARE}))
    except OSError as exc:
        raise DistillabError(f"{describe_write_failure(exc)} while writing {out}") from None
    finally:
        plt.close(fig)
    return out


def written_by_distillab(path: Path) -> bool:
    """Whether `path` is a PNG figure distillab wrote (its Software text says so)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PNG_SOFTWARE
    except (OSError, ValueError):
        return False
