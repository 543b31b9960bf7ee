"""Records that stay true: resume checks the run's identity and config, finished runs stay untouched, a
failed write keeps the last good checkpoint, and bad input of every kind is one line."""

import json
import shutil

import pytest
import torch
import yaml

from conftest import tiny_config, tiny_settings
from distillab.cli import main
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint

# two epochs on 256 images: a finished run to resume, extend and refuse changes to (its subset is not 200)
RUN = ("data.train_subset=256", "train.epochs=2")


def write_config(tmp_path, name: str, *changes: str):
    return tiny_config(tmp_path, name, *RUN, *changes)


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("distillab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def finished(tmp_path):
    assert main(["train", str(write_config(tmp_path, "done"))]) == 0
    return tmp_path / "runs" / "done"


@pytest.mark.parametrize(("override", "key"), [
    ("seed=7", "seed"), ("train.optim.lr=0.5", "train.optim.lr"), ("train.batch_size=32", "train.batch_size"),
    ("data.train_subset=200", "data.train_subset"),
])
def test_resume_refuses_a_change_that_alters_the_run_and_writes_nothing(finished, capsys, override, key):
    before = snapshot(finished)
    capsys.readouterr()
    assert main(["train", "--resume", str(finished), "--set", override]) == 2
    assert f"{key} differs from the config the checkpoint was trained with" in one_line(capsys)
    assert snapshot(finished) == before


def test_resuming_a_finished_run_with_no_new_epochs_changes_nothing(finished):
    before = snapshot(finished)
    assert main(["train", "--resume", str(finished)]) == 0
    assert snapshot(finished) == before


def test_resume_may_extend_a_finished_run(finished):
    assert main(["train", "--resume", str(finished), "--set", "train.epochs=3"]) == 0
    records = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert json.loads((finished / "summary.json").read_text())["epochs"] == 3


def test_resume_without_a_checkpoint_is_an_error_not_a_restart(finished, capsys):
    (finished / CHECKPOINT_FILE).unlink()
    (finished / "summary.json").unlink()
    before = snapshot(finished)
    capsys.readouterr()
    assert main(["train", "--resume", str(finished)]) == 2
    assert "has no checkpoint" in one_line(capsys)
    assert snapshot(finished) == before


def test_another_runs_checkpoint_is_refused(tmp_path, finished, capsys):
    assert main(["train", str(write_config(tmp_path, "other"))]) == 0
    other = tmp_path / "runs" / "other"
    (finished / "summary.json").unlink()
    shutil.copy(other / CHECKPOINT_FILE, finished / CHECKPOINT_FILE)
    capsys.readouterr()
    assert main(["train", "--resume", str(finished)]) == 2
    assert "belongs to another run" in one_line(capsys)


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_until_disk_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's checkpoint: as torch reports a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1478")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    cfg = write_config(tmp_path, "full", "train.epochs=3")
    assert main(["train", str(cfg)]) == 2
    err = one_line(capsys)
    assert "no space left on device while writing" in err and "the last good checkpoint, epoch 1, is kept" in err
    run_dir = tmp_path / "runs" / "full"
    assert load_checkpoint(run_dir / CHECKPOINT_FILE)["epoch"] == 1
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no half-written file left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir / CHECKPOINT_FILE)["epoch"] == 3


def test_report_skips_a_torn_last_metrics_line(finished, tmp_path, capsys):
    with open(finished / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_a')
    assert main(["report", str(finished), "--output", str(tmp_path / "r.png")]) == 0
    assert "skipped a torn last line" in capsys.readouterr().err


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    settings = tiny_settings(*RUN, f"output_dir={tmp_path / 'runs'}", "name=bomb")
    del settings["method"]  # given below, through the alias
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb + "method: {name: ce, options: {label_smoothing: {x: *i}}}\n" + yaml.safe_dump(settings))
    assert main(["train", str(path)]) == 2
    assert "YAML expands to more than" in one_line(capsys)


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.device=gpu"], "train.device: String should match pattern"),
    (["student.kwargs.foo=1"], "does not take the kwargs ['foo']"),
    ([f"seed={2 ** 70}"], "seed: Input should be less than"),
    (["data.name=synthetic", "data.synthetic.image_shape=[1, 0, 8]"], "data.synthetic.image_shape.1: Input should "
                                                                      "be greater than 0"),
    ([f"output_dir={__file__}"], "cannot create the run directory"),
])
def test_more_bad_input_is_one_line(tmp_path, capsys, overrides, message):
    argv = ["train", str(write_config(tmp_path, "bad"))]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    assert message in one_line(capsys)


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)))
    assert main(["train", str(path)]) == 2
    assert "not a text file" in one_line(capsys)


def test_export_to_an_existing_directory_is_one_line(finished, tmp_path, capsys):
    assert main(["export", str(finished), "--output", str(tmp_path)]) == 2
    assert "is a directory" in one_line(capsys)


def test_eval_every_evaluates_on_its_epochs_and_always_the_last(tmp_path):
    cfg = write_config(tmp_path, "sparse", "train.epochs=5", "train.eval_every=2")
    assert main(["train", str(cfg)]) == 0
    run_dir = tmp_path / "runs" / "sparse"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [("test_acc" in r, "val_acc" in r) for r in records] == [(False, False), (True, True), (False, False),
                                                                    (True, True), (True, True)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_acc"] == records[-1]["test_acc"] and summary["best_val"]["epoch"] in (2, 4, 5)
    assert main(["report", str(run_dir), "--output", str(tmp_path / "r.png")]) == 0
