"""benchmarks/figures.py remakes every committed figure from committed files, and the plateau figure's curves sit
at the epochs where the runs were evaluated."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillab.bench.plots import mean_curve, plateau_curves, plot_plateau
from distillab.bench.suite import load_suite, records_dir

ROOT = Path(__file__).resolve().parents[1]


def _load_figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["figures"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


figures = _load_figures()


def _is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_every_png_under_results_is_regenerated_or_kept_with_a_reason():
    assert figures.unlisted(ROOT) == []
    pngs = [f.png for f in figures.FIGURES]
    assert len(pngs) == len(set(pngs)) and not set(pngs) & set(figures.KEPT)
    for png in [*pngs, *figures.KEPT]:
        assert (ROOT / png).is_file(), png
    assert all(len(why) > 40 for why in figures.KEPT.values())


@pytest.mark.parametrize("figure", figures.FIGURES, ids=lambda f: Path(f.png).name)
def test_each_source_is_committed_and_matches_its_records(figure):
    assert figure.plot in figures.PLOTS
    source = json.loads((ROOT / figure.source).read_text())
    if figure.records is None:
        return
    # the records folder is the one `bench suite` saves this suite's runs in
    assert ROOT / figure.records == ROOT / records_dir(load_suite(ROOT / "suites" / f"{source['suite']}.yaml"))
    if figure.plot != "curves":
        return
    for label, row in source["runs"].items():  # every seed the table counts has its record, with the same result
        for seed, test_acc in zip(row["seeds"], row["per_seed_test_acc"], strict=True):
            record = ROOT / figure.records / f"{label}_s{seed}"
            assert (record / "metrics.jsonl").is_file(), record
            assert json.loads((record / "summary.json").read_text())["test_acc"] == test_acc, record


def test_each_plot_function_draws_a_png_from_the_committed_files(tmp_path):
    chosen = {}
    for figure in figures.FIGURES:  # the smallest figure of each plot function
        chosen.setdefault(figure.plot, figure)
        if (ROOT / figure.png).stat().st_size < (ROOT / chosen[figure.plot].png).stat().st_size:
            chosen[figure.plot] = figure
    assert set(chosen) == set(figures.PLOTS)
    for figure in chosen.values():
        out = figures.draw(figure, ROOT, tmp_path)
        assert out == tmp_path / Path(figure.png).name
        assert _is_png(out) == _is_png(ROOT / figure.png), figure.png  # the committed figure's layout


def test_draw_curves_refuses_a_missing_record(tmp_path):
    figure = next(f for f in figures.FIGURES if f.plot == "curves")
    broken = figures.Figure(figure.png, "curves", figure.source, str(tmp_path / "no_records"))
    with pytest.raises(FileNotFoundError, match="no committed record"):
        figures.draw(broken, ROOT, tmp_path)


def _write_run(folder: Path, epochs: int, every: int, val: dict[int, float]) -> None:
    """metrics.jsonl of a run evaluated every `every` epochs and at the last (train.eval_every)."""
    folder.mkdir(parents=True)
    lines = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, "loss": 1.0 / epoch}
        if epoch % every == 0 or epoch == epochs:
            record["val_acc"] = val[epoch]
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plateau_curves_are_drawn_at_the_evaluated_epochs(tmp_path):
    _write_run(tmp_path / "ce_e12_s0", 12, 5, {5: 80.0, 10: 85.0, 12: 86.0})
    _write_run(tmp_path / "ce_e12_s1", 12, 5, {5: 82.0, 10: 87.0, 12: 88.0})
    _write_run(tmp_path / "ce_e4_s0", 4, 1, {1: 70.0, 2: 75.0, 3: 78.0, 4: 79.0})
    row = {"per_seed_test_acc": [85.0, 87.0], "per_seed_val_acc": [86.0, 88.0], "test_acc": {"mean": 86.0}}
    results = {"suite": "tiny_plateau", "runs": {
        "ce_e4": {**row, "epochs": 4, "seeds": [0], "per_seed_val_acc": [79.0]},
        "ce_e12": {**row, "epochs": 12, "seeds": [0, 1]},
        "ce_e20": {**row, "epochs": 20, "seeds": [0]}}}  # no record: left out of the curves

    curves = plateau_curves(results, tmp_path)
    assert list(curves) == ["ce_e4", "ce_e12"]
    epochs, values = curves["ce_e12"]
    assert epochs.tolist() == [5, 10, 12]  # the epochs, not the evaluation count 1, 2, 3
    assert values.tolist() == [81.0, 86.0, 87.0]
    assert curves["ce_e4"][0].tolist() == [1, 2, 3, 4]

    width_both, _ = _is_png(plot_plateau(results, curves, tmp_path / "both.png"))
    width_one, _ = _is_png(plot_plateau(results, {}, tmp_path / "budgets_only.png"))
    assert width_both == 2 * width_one


def test_mean_curve_keeps_the_epochs_every_run_evaluated():
    a = [{"epoch": 1, "val_acc": 1.0}, {"epoch": 2}, {"epoch": 3, "val_acc": 3.0}]
    b = [{"epoch": 1, "val_acc": 3.0}, {"epoch": 2, "val_acc": 9.0}, {"epoch": 3, "val_acc": 5.0}]
    epochs, values = mean_curve([a, b], "val_acc")
    assert epochs.tolist() == [1, 3] and np.allclose(values, [2.0, 4.0])
    assert mean_curve([], "val_acc")[0].size == 0
