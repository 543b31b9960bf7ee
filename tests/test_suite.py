import json

import pytest

from distillab.bench.plots import curves_of
from distillab.bench.report import report
from distillab.bench.suite import load_suite, run_suite
from distillab.errors import ConfigError, DistillabError


def test_suite_of_two_methods_two_seeds_aggregates_and_resumes(tmp_path):
    cfg = tmp_path / "ce.yaml"
    cfg.write_text("student: {name: resnet8}\nmethod: {name: ce}\n"
                   "data: {name: digits, val_size: 100, train_subset: 300, augment: {flip: false}}\n"
                   "train: {epochs: 1, batch_size: 64, progress: false}\n")
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
    for figure in ("tiny_accuracy.png", "tiny_curves.png"):
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


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(DistillabError, match="not a run directory"):
        report([tmp_path], tmp_path / "r.png")
