"""Run-directory safety: a run name is one path component, and --force deletes only a distillab run."""

import os

import pytest

from conftest import tiny_config
from distillab.cli import main
from distillab.config_files import load_config
from distillab.run import RUN_MARKER


@pytest.fixture
def layout(tmp_path):
    """tmp/work/runs (the output directory), a file beside it and one inside it, and a config file."""
    work = tmp_path / "work"
    runs = work / "runs"
    runs.mkdir(parents=True)
    (work / "beside.txt").write_text("keep me")
    (runs / "other_run.txt").write_text("keep me too")
    config = tiny_config(tmp_path, None, f"output_dir={runs}")  # the tiny run; each test names it with --set
    return work, runs, config


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("distillab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../escape", "/abs/path", "x" * 201, "tab\there"])
def test_a_run_name_that_is_not_one_component_is_refused_before_anything_is_touched(layout, capsys, name):
    work, _runs, config = layout
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    assert main(["train", str(config), "--force", "--set", f"name={name!r}"]) == 2
    err = one_line_error(capsys)
    assert "name" in err and "one directory name inside output_dir" in err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    assert (work / "beside.txt").read_text() == "keep me"


def test_absolute_name_in_a_config_file_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.bin").write_text("precious")
    path = tmp_path / "run.yaml"
    path.write_text(f"name: {victim}\nstudent: {{name: resnet8}}\n")
    with pytest.raises(Exception, match="path separator"):
        load_config(path)
    assert (victim / "data.bin").read_text() == "precious"


def test_force_restarts_a_real_run_but_not_a_directory_distillab_did_not_make(layout, capsys):
    _work, runs, config = layout
    assert main(["train", str(config), "--set", "name=mine"]) == 0
    assert (runs / "mine" / RUN_MARKER).is_file()
    (runs / "mine" / "stale.txt").write_text("from the first run")
    assert main(["train", str(config), "--set", "name=mine", "--force"]) == 0
    assert not (runs / "mine" / "stale.txt").exists() and (runs / "mine" / "summary.json").is_file()

    foreign = runs / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("not a run")
    capsys.readouterr()
    assert main(["train", str(config), "--set", "name=photos", "--force"]) == 2
    assert "not a distillab run directory" in one_line_error(capsys)
    assert (foreign / "holiday.jpg").read_text() == "not a run"


def test_force_does_not_follow_a_symlinked_run_directory(layout, tmp_path, capsys):
    _work, runs, config = layout
    assert main(["train", str(config), "--set", "name=real"]) == 0
    target = tmp_path / "elsewhere"
    os.rename(runs / "real", target)  # a genuine run, moved away and linked back
    (runs / "linked").symlink_to(target, target_is_directory=True)
    capsys.readouterr()
    assert main(["train", str(config), "--set", "name=linked", "--force"]) == 2
    assert "symbolic link" in one_line_error(capsys)
    assert (target / "summary.json").is_file() and (target / RUN_MARKER).is_file()


def test_a_file_in_place_of_the_run_directory_is_an_error(layout, capsys):
    _work, runs, config = layout
    assert main(["train", str(config), "--set", "name=other_run.txt", "--force"]) == 2
    assert "is a file" in one_line_error(capsys)
    assert (runs / "other_run.txt").read_text() == "keep me too"


def test_demo_never_deletes_a_directory_in_its_way(tmp_path, capsys):
    teacher = tmp_path / "demo" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "student.safetensors").write_text("someone's trained teacher")
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--seeds", "1"]) == 2
    assert "already exists" in one_line_error(capsys)
    assert (teacher / "student.safetensors").read_text() == "someone's trained teacher"
