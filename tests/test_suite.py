import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from distillab.bench.plots import curves_of
from distillab.bench.report import report
from distillab.bench.stats import paired_difference, verdict
from distillab.bench.suite import entry_config, grid_points, load_suite, overrides_of, run_suite, tune_suite
from distillab.cli import main
from distillab.config_files import dump_config
from distillab.engine.checkpoint import CHECKPOINT_FILE
from distillab.engine.lock import RunLock, RunLockedError
from distillab.errors import ConfigError, DistillabError

ROOT = Path(__file__).resolve().parents[1]


def test_suite_of_two_methods_two_seeds_aggregates_and_resumes(tmp_path):
    cfg = tiny_config(tmp_path, "ce", "data.train_subset=300")  # the suite names and places each run
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(f"name: tiny\noutput_dir: {tmp_path / 'runs'}\nresults_dir: {tmp_path / 'results'}\n"
                          f"runs:\n  ce: {{config: {cfg}}}\n"
                          f"  ce_smooth: {{config: {cfg}, set: [method.options.label_smoothing=0.1]}}\n")
    results = run_suite(load_suite(suite_file), seeds=2)
    row = results["runs"]["ce"]
    assert row["seeds"] == [0, 1] and row["test_acc"]["n"] == 2
    per_seed = row["per_seed_test_acc"]
    assert abs(row["test_acc"]["mean"] - sum(per_seed) / 2) < 1e-9
    assert json.loads((tmp_path / "results" / "tiny.json").read_text())["runs"].keys() == {"ce", "ce_smooth"}
    assert "| ce_smooth | resnet8 | 2 |" in (tmp_path / "results" / "tiny.md").read_text()
    for figure in ("tiny.png", "tiny_curves.png"):
        assert (tmp_path / "results" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_dirs = sorted((tmp_path / "runs").iterdir())
    assert [d.name for d in report_dirs] == ["ce_s0", "ce_s1", "ce_smooth_s0", "ce_smooth_s1"]
    table, figure = report(report_dirs, tmp_path / "report.png", group_seeds=True)
    assert figure.read_bytes()[:4] == b"\x89PNG" and table.row_count == 4
    assert list(curves_of({"ce": report_dirs[:2]})["ce"]["test_acc"].shape) == [2, 1]
    mtime = (tmp_path / "runs" / "ce_s0" / "summary.json").stat().st_mtime
    run_suite(load_suite(suite_file), seeds=2)  # finished runs are skipped
    assert (tmp_path / "runs" / "ce_s0" / "summary.json").stat().st_mtime == mtime
    suite_file.write_text(suite_file.read_text().replace("label_smoothing=0.1", "label_smoothing=0.2"))
    with pytest.raises(ConfigError, match="made from another config"):
        run_suite(load_suite(suite_file), seeds=2)
    # nor is the stale run counted when only the table is written, or when another entry is trained
    with pytest.raises(ConfigError, match="ce_smooth_s0 exists but was made from another config"):
        run_suite(load_suite(suite_file), seeds=2, train=False)
    with pytest.raises(ConfigError, match="ce_smooth_s0 exists but was made from another config"):
        run_suite(load_suite(suite_file), seeds=2, only=["ce"])


def test_a_fresh_clone_restores_finished_runs_from_the_committed_records(tmp_path):
    suite_file, _ = write_suite(tmp_path)
    first = run_suite(load_suite(suite_file), seeds=2)
    records = tmp_path / "results" / "runs" / "runs"  # <results>/runs/<output_dir name>
    assert sorted(p.name for p in records.iterdir()) == ["ce_s0", "ce_s1", "ce_smooth_s0", "ce_smooth_s1"]
    assert sorted(p.name for p in (records / "ce_s0").iterdir()) == [
        ".distillab-run", "config.yaml", "metrics.jsonl", "summary.json"]  # no checkpoint: small enough to commit
    shutil.rmtree(tmp_path / "runs")  # what a fresh clone lacks
    again = run_suite(load_suite(suite_file), seeds=2)
    assert again["runs"] == first["runs"]
    assert not (tmp_path / "runs" / "ce_s0" / CHECKPOINT_FILE).exists()  # restored, not retrained
    restored = tmp_path / "runs" / "ce_s0" / "summary.json"
    assert restored.read_text() == (records / "ce_s0" / "summary.json").read_text()
    shutil.rmtree(tmp_path / "runs")
    suite_file.write_text(suite_file.read_text().replace("label_smoothing=0.3", "label_smoothing=0.1"))
    with pytest.raises(ConfigError, match="runs/runs/ce_smooth_s0 was made from another config"):
        run_suite(load_suite(suite_file), seeds=2)


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(DistillabError, match="not a run directory"):
        report([tmp_path], tmp_path / "r.png")


T_975_1 = 12.706204736  # Student's t, 97.5 % quantile, 1 degree of freedom (printed tables)
T_975_4 = 2.776445105   # ... 4 degrees of freedom

TINY_CE = ("data.train_subset=300", "train.epochs=3")


def write_suite(tmp_path, extra: str = "") -> tuple:
    cfg = tiny_config(tmp_path, "ce", *TINY_CE)
    budget = tmp_path / "budget.yaml"
    budget.write_text("train: {epochs: 1}\n")  # laid over the entry's 3 epochs
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(f"name: paired\noutput_dir: {tmp_path / 'runs'}\nresults_dir: {tmp_path / 'results'}\n"
                          f"budget: {budget}\nreference: ce\n{extra}runs:\n  ce: {{config: {cfg}}}\n"
                          f"  ce_smooth: {{config: {cfg}, set: [method.options.label_smoothing=0.3]}}\n")
    return suite_file, budget


def test_paired_difference_matches_a_hand_computation():
    a = {0: 80.0, 1: 82.0, 2: 81.0, 3: 85.0, 4: 84.0}
    ref = {0: 79.0, 1: 81.5, 2: 81.0, 3: 83.0, 4: 82.5, 7: 99.0}  # seed 7 has no partner: left out
    d = paired_difference(a, ref)
    diffs = [1.0, 0.5, 0.0, 2.0, 1.5]  # by hand
    mean = sum(diffs) / 5  # 1.0
    std = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)  # sqrt(2.5 / 4)
    assert d["seeds"] == [0, 1, 2, 3, 4] and d["per_seed"] == diffs
    assert d["mean"] == pytest.approx(1.0) and d["std"] == pytest.approx(std)
    assert d["ci_low"] == pytest.approx(1.0 - T_975_4 * std / math.sqrt(5))
    assert d["ci_high"] == pytest.approx(1.0 + T_975_4 * std / math.sqrt(5))
    assert d["significant"]  # 1.0 - 0.98 > 0
    noisy = paired_difference({0: 80.0, 1: 82.0}, {0: 79.0, 1: 83.0})  # +1, -1: mean 0
    assert noisy["mean"] == 0 and not noisy["significant"] and noisy["ci_low"] < 0 < noisy["ci_high"]
    assert paired_difference({0: 1.0}, {1: 2.0}) is None
    single = paired_difference({0: 1.0}, {0: 0.5})
    assert single["ci_low"] is None and not single["significant"]
    assert [verdict(x) for x in (d, noisy, single)] == ["better", "tie", "one seed"]


def test_suite_pairs_every_run_with_the_reference_by_seed(tmp_path):
    suite_file, _ = write_suite(tmp_path)
    results = run_suite(load_suite(suite_file), seeds=2)
    summaries = {(label, s): json.loads((tmp_path / "runs" / f"{label}_s{s}" / "summary.json").read_text())
                 for label in ("ce", "ce_smooth") for s in (0, 1)}
    assert all(v["epochs"] == 1 for v in summaries.values())  # the budget replaced the entry's 3 epochs
    d = [summaries[("ce_smooth", s)]["test_acc"] - summaries[("ce", s)]["test_acc"] for s in (0, 1)]
    row = results["runs"]["ce_smooth"]
    assert row["vs_reference"]["per_seed"] == pytest.approx(d)
    assert row["vs_reference"]["mean"] == pytest.approx((d[0] + d[1]) / 2)
    half = T_975_1 * abs(d[0] - d[1]) / 2  # t * (|d0 - d1| / sqrt 2) / sqrt 2
    assert row["vs_reference"]["ci_low"] == pytest.approx((d[0] + d[1]) / 2 - half)
    assert row["vs_reference"]["ci_high"] == pytest.approx((d[0] + d[1]) / 2 + half)
    expected = "tie" if (d[0] + d[1]) / 2 - half <= 0 <= (d[0] + d[1]) / 2 + half else "better or worse"
    assert (row["verdict"] == "tie") == (expected == "tie")
    assert results["runs"]["ce"]["vs_reference"] is None and results["runs"]["ce"]["verdict"] is None
    saved = json.loads((tmp_path / "results" / "paired.json").read_text())
    assert saved["runs"]["ce_smooth"]["per_seed_test_acc"] == [summaries[("ce_smooth", s)]["test_acc"] for s in (0, 1)]
    md = (tmp_path / "results" / "paired.md").read_text()
    assert "| ce | resnet8 | 2 |" in md and f"{row['vs_reference']['mean']:+.2f} [" in md
    env = summaries[("ce", 0)]["environment"]  # every machine a row's runs came from, with its instruction set
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    machine = f"{env['device']}, {env['cpu_capability']}"
    assert results["environment"]["devices"] == {machine: 4} and f"{machine} (4 runs)" in md
    assert "more than one machine" not in md
    moved = tmp_path / "runs" / "ce_smooth_s1" / "summary.json"  # as if that run had been made elsewhere
    moved.write_text(json.dumps({**summaries[("ce_smooth", 1)], "environment": {**env, "device": "Other CPU"}}))
    assert main(["bench", "suite", str(suite_file), "--seeds", "2", "--no-train"]) == 0
    md = (tmp_path / "results" / "paired.md").read_text()
    assert f"{machine} (3 runs), Other CPU, {env['cpu_capability']} (1 runs)" in md and "more than one machine" in md
    assert (tmp_path / "results" / "paired.png").read_bytes()[:4] == b"\x89PNG"


def test_partial_suite_is_labelled_incomplete(tmp_path, capsys):
    suite_file, _ = write_suite(tmp_path)
    assert main(["bench", "suite", str(suite_file), "--seeds", "2", "--only", "ce"]) == 0
    results = json.loads((tmp_path / "results" / "paired.json").read_text())
    assert list(results["runs"]) == ["ce"] and results["not_run"] == ["ce_smooth"]
    assert "**Incomplete**" in (tmp_path / "results" / "paired.md").read_text()
    assert main(["bench", "suite", str(suite_file), "--only", "nope"]) == 2
    assert "'nope' is not a label" in capsys.readouterr().err


def test_tuning_picks_by_validation_accuracy_and_applies_the_choice(tmp_path):
    grid = "tune:\n  seeds: [7, 8]\n  grids:\n    ce_smooth: {method.options.label_smoothing: [0.0, 0.2]}\n"
    suite_file, _ = write_suite(tmp_path, grid)
    suite = load_suite(suite_file)
    tune_suite(suite)
    runs = tmp_path / "runs"
    assert sorted(d.name for d in runs.iterdir()) == ["ce_smooth_tune0_s7", "ce_smooth_tune0_s8",
                                                      "ce_smooth_tune1_s7", "ce_smooth_tune1_s8"]
    # Make setting 1 the best on validation and the worst on test: the choice must follow validation.
    for i, (val, test) in enumerate([(50.0, 99.0), (60.0, 1.0)]):
        for seed in (7, 8):
            path = runs / f"ce_smooth_tune{i}_s{seed}" / "summary.json"
            summary = json.loads(path.read_text())
            path.write_text(json.dumps({**summary, "val_acc": val + seed, "test_acc": test}))
    assert tune_suite(suite, train=False) == {"ce_smooth": ["method.options.label_smoothing=0.2"]}
    assert main(["bench", "tune", str(suite_file)]) == 0  # the command: every tuning run is finished already
    record = json.loads((tmp_path / "results" / "paired_tuning.json").read_text())
    assert record["ce_smooth"]["chosen"] == 1
    assert record["ce_smooth"]["rows"][1]["val_acc"]["mean"] == pytest.approx(67.5)
    results = run_suite(suite, seeds=1)
    assert results["runs"]["ce_smooth"]["tuned"] == ["method.options.label_smoothing=0.2"]
    saved = yaml.safe_load((runs / "ce_smooth_s0" / "config.yaml").read_text())
    assert saved["method"]["options"]["label_smoothing"] == 0.2
    # An ablation takes the values tuned for the label it names; `--only` trains it without the other rows.
    suite_file.write_text(suite_file.read_text() + f"  ablation: {{config: {tmp_path / 'ce.yaml'}, "
                          "set: [train.batch_size=32], tuned_as: ce_smooth}\n")
    before = {d.name for d in runs.iterdir()}
    results = run_suite(load_suite(suite_file), seeds=1, only=["ablation"])
    assert {d.name for d in runs.iterdir()} - before == {"ablation_s0"}
    assert results["runs"]["ablation"]["tuned"] == ["method.options.label_smoothing=0.2"]
    saved = yaml.safe_load((runs / "ablation_s0" / "config.yaml").read_text())
    assert saved["method"]["options"]["label_smoothing"] == 0.2 and saved["train"]["batch_size"] == 32


def test_tuning_grids_are_small_and_name_real_labels(tmp_path):
    big = "tune:\n  grids:\n    ce: {method.options.label_smoothing: [0.0, 0.1, 0.2, 0.3, 0.4]}\n"
    suite_file, _ = write_suite(tmp_path, big)
    with pytest.raises(ConfigError, match="at most 4 settings"):
        load_suite(suite_file)
    suite_file, _ = write_suite(tmp_path, "tune:\n  grids:\n    kd: {method.options.alpha: [0.5]}\n")
    with pytest.raises(ConfigError, match="'kd' is not a label"):
        load_suite(suite_file)
    suite_file, _ = write_suite(tmp_path)
    assert main(["bench", "tune", str(suite_file)]) == 2  # nothing to tune
    suite_file.write_text(suite_file.read_text() + "  ablation: {config: ce.yaml, tuned_as: ce}\n")
    with pytest.raises(ConfigError, match=r"runs\.ablation\.tuned_as: 'ce' has no grid"):
        load_suite(suite_file)


def test_run_lock_names_its_holder_and_is_free_after_release(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert "pid" in RunLock(tmp_path).holder()
    with pytest.raises(RunLockedError, match="in use by pid"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert RunLock(tmp_path).holder() is None  # the file stays, the lock does not: a stale file is free
    with RunLock(tmp_path):
        pass


def test_training_into_a_locked_run_directory_is_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "busy", *TINY_CE)
    (tmp_path / "runs" / "busy").mkdir(parents=True)
    with RunLock(tmp_path / "runs" / "busy"):
        assert main(["train", str(cfg), "--force"]) == 2
    err = capsys.readouterr().err
    assert "is in use by pid" in err and err.count("\n") == 1
    assert main(["train", str(cfg)]) == 0  # free again


@pytest.mark.parametrize("budget_file", ["_converged.yaml", "_converged_vit.yaml"])
def test_the_shipped_teachers_load_and_match_their_budgets_sha256(monkeypatch, budget_file):
    from pathlib import Path

    from distillab import models
    from distillab.config_files import read_config_file
    from distillab.engine.checkpoint import load_weights

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # suites name their files relative to the repository root
    budget = read_config_file(root / "configs/fashion_mnist" / budget_file)
    spec = budget["teacher"]
    teacher = models.build(spec["name"], num_classes=10, in_channels=1, **spec.get("kwargs", {}))
    digest = load_weights(teacher, root / spec["checkpoint"], "teacher")
    assert digest == spec["sha256"]
    summary = json.loads((root / spec["checkpoint"] / "summary.json").read_text())
    assert summary["student"] == spec["name"] and summary["dataset"] == "fashion_mnist"
    assert summary["test_acc"] > 91.0  # both beat the resnet8 student alone (88.94 %) by two points or more
    suite = load_suite(root / "suites/fashion_mnist_leaderboard.yaml")  # the leaderboard validates as shipped
    assert suite.reference == "kd" and suite.budget == Path("configs/fashion_mnist/_converged.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "suites").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_suite_resolves_every_entry(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # suites name their configs relative to the repository
    suite = load_suite(path.relative_to(ROOT))
    for label in suite.runs:
        cfg = entry_config(suite, label, 0)
        assert cfg.run_name == f"{label}_s0"
    if suite.tune:
        for label, grid in suite.tune.grids.items():
            for point in grid_points(grid):
                entry_config(suite, label, suite.tune.seeds[0], overrides_of(point))


def test_a_typo_in_the_last_entry_is_refused_before_the_first_run(tmp_path):
    suite_file, _ = write_suite(tmp_path)
    suite_file.write_text(suite_file.read_text() + f"  typo: {{config: {tmp_path / 'ce.yaml'}, "
                          "set: [method.options.label_smothing=0.1]}\n")
    with pytest.raises(ConfigError, match=r"label_smothing: unknown key; did you mean 'label_smoothing'"):
        run_suite(load_suite(suite_file), seeds=1)
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_charts_draw_one_line_per_teacher_and_distinct_colours_past_ten_runs():
    from distillab.bench.plots import line_styles, teacher_lines

    rows = {"a": {"teacher": "resnet20", "teacher_sha256": "aa11", "teacher_test_acc": 93.85},
            "b": {"teacher": "resnet20", "teacher_sha256": "aa11", "teacher_test_acc": 93.85},
            "c": {"teacher": "vit_tiny", "teacher_sha256": "bb22", "teacher_test_acc": 91.0},
            "d": {"teacher": "resnet20", "teacher_sha256": "cc33", "teacher_test_acc": 92.0},
            "ce": {"teacher": None, "teacher_sha256": None, "teacher_test_acc": None}}
    assert teacher_lines(rows) == {"resnet20 aa11": 93.85, "vit_tiny": 91.0, "resnet20 cc33": 92.0}
    styles = line_styles(25)
    assert len({(str(s["color"]), s["linestyle"]) for s in styles}) == 25
    assert len({str(s["color"]) for s in line_styles(10)}) == 10


def test_an_entry_budget_replaces_the_suites_and_shares_the_other_suites_runs(tmp_path, monkeypatch):
    suite_file, _ = write_suite(tmp_path)
    other = tmp_path / "other_budget.yaml"
    other.write_text("train: {epochs: 2}\n")
    suite_file.write_text(suite_file.read_text() + f"  ce_other: {{config: {tmp_path / 'ce.yaml'}, budget: {other}}}\n")
    suite = load_suite(suite_file)
    assert entry_config(suite, "ce", 0).train.epochs == 1 and entry_config(suite, "ce_other", 0).train.epochs == 2
    missing = tmp_path / "suite2.yaml"
    missing.write_text(suite_file.read_text().replace(str(other), str(tmp_path / "nope.yaml")))
    with pytest.raises(ConfigError, match=r"runs.ce_other.budget: config file .*nope.yaml does not exist"):
        load_suite(missing)
    monkeypatch.chdir(ROOT)  # the ViT suite's teacher-free rows are, config for config, the CNN suite's runs
    vit, cnn = (load_suite(Path(f"suites/fashion_mnist_{name}_converged.yaml")) for name in ("vit", "rdr"))
    for label in ("ce", "rdr_beta0"):
        assert dump_config(entry_config(vit, label, 0)) == dump_config(entry_config(cnn, label, 0)), label


def test_a_row_is_also_paired_with_its_own_baseline_as_a_second_family():
    """`baseline:` adds a second paired comparison per row (its recipe's control, or the method its paper claims to
    beat), checked here by hand: differences, interval, and Holm over that family alone."""
    from distillab.bench.suite import Suite, _baseline_cell, aggregate

    suite = Suite.model_validate({"name": "own", "reference": "kd", "runs": {
        "kd": {"config": "kd.yaml"}, "kd_ce1": {"config": "kd.yaml"},
        "kr": {"config": "kr.yaml", "baseline": "kd_ce1"}, "rdr": {"config": "rdr.yaml", "baseline": "kd_ce1"}}})
    acc = {"kd": [91.0, 91.2, 91.1], "kd_ce1": [91.5, 91.4, 91.9], "kr": [91.9, 91.7, 92.4], "rdr": [91.0, 92.4, 91.2]}
    env = {"device": "cpu", "torch": "2", "threads": 1}
    summaries = {(label, seed): {"seed": seed, "test_acc": a, "val_acc": a, "best_epoch_test_acc": a,
                                 "images_per_s": 1.0, "wall_time_s": 1.0, "epochs": 1, "student": "resnet8",
                                 "dataset": "d", "environment": env}
                 for label, values in acc.items() for seed, a in enumerate(values)}
    rows = aggregate(suite, summaries, {}, 3)["runs"]
    kr = rows["kr"]["vs_baseline"]
    d = [0.4, 0.3, 0.5]  # kr - kd_ce1 per seed
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n); std of (0.4, 0.3, 0.5) is 0.1
    assert kr["label"] == "kd_ce1" and kr["difference"]["per_seed"] == pytest.approx(d)
    assert kr["difference"]["ci_low"] == pytest.approx(0.4 - half) and kr["verdict"] == "better"
    # p of kr: t = 0.4 / (0.1 / sqrt 3) = 6.93, 2 df -> 0.0202; rdr's (-0.5, 1.0, -0.7) is far from significant.
    # Holm over 2: 0.0202 <= 0.05 / 2 rejects for kr, then rdr's p > 0.05 stands
    assert kr["difference"]["p_value"] == pytest.approx(0.0202, abs=5e-4) and kr["holm"] == "better"
    assert rows["rdr"]["vs_baseline"]["holm"] == "tie" and "vs_baseline" not in rows["kd"]
    assert _baseline_cell(rows["kr"]).startswith("kd_ce1: +0.40 [") and "better, p 0.020 (Holm: better)" in \
        _baseline_cell(rows["kr"])
    # a third comparison in the family: 0.0202 > 0.05 / 3, so Holm stops at once and kr's win is a tie there
    suite.runs["at"] = suite.runs["kr"].model_copy(update={"baseline": "kd"})
    summaries.update({("at", seed): {**summaries[("kd", seed)], "test_acc": a} for seed, a in enumerate([91.3, 90.9,
                                                                                                     91.2])})
    rows = aggregate(suite, summaries, {}, 3)["runs"]
    assert rows["kr"]["vs_baseline"]["holm"] == "tie" and rows["kr"]["vs_baseline"]["verdict"] == "better"
    with pytest.raises(ValueError, match=r"runs\.kr\.baseline: 'kr' is not another label"):
        Suite.model_validate({"name": "x", "runs": {"kr": {"config": "kr.yaml", "baseline": "kr"}}})
