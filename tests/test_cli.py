import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from distillab.cli import main
from distillab.config_files import load_config


@pytest.fixture
def config(tmp_path):
    """The tiny ce run as a YAML file: its run directory is runs/tiny."""
    return tiny_config(tmp_path, "tiny")


def test_models_lists_the_zoo_with_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet8x4" in out and "1,233,540" in out and "7,433,860" in out


def test_methods_lists_registered_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("ce", "kd", "fitnet", "temperature=4.0"):
        assert name in out


def test_train_then_eval_reports_the_same_accuracy(config, tmp_path, capsys):
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "tiny")]) == 0
    assert f"{summary['test_acc']:.2f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.epocs=3"], "train.epocs: unknown key; did you mean 'epochs'?"),
        (["--set", "train.batch_size=0"], "train.batch_size: Input should be greater than 0"),
        (["--set", "student.name=resnet9"], "unknown model 'resnet9'; did you mean"),
        (["--set", "method.name=kdd"], "unknown method 'kdd'; did you mean 'kd'?"),
        (["--set", "data.train_subset=99999"], "data.train_subset=99999 exceeds"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(config, capsys, extra, message):
    assert main(["train", str(config), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_existing_run_needs_resume_or_force(config, capsys):
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", str(config), "--force"]) == 0


def test_resume_takes_no_config_argument(config, tmp_path, capsys):
    assert main(["train", str(config), "--resume", str(tmp_path)]) == 2
    assert "drop the config argument" in capsys.readouterr().err


def test_module_entry_point_prints_no_traceback_without_debug(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {name: resnet8}\ntrain: {optim: {lr: -1}}\n")
    proc = subprocess.run([sys.executable, "-m", "distillab", "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"distillab: error: {bad}: train.optim.lr: Input should be greater than 0 (got -1)"
    proc = subprocess.run([sys.executable, "-m", "distillab", "--debug", "train", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_configs_ship_with_the_package_and_copy_out_with_their_bases(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkout here
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert "configs/fashion_mnist/kd.yaml" in listed and "configs/cifar100/_base.yaml" in listed
    assert load_config(Path("configs/fashion_mnist/kd.yaml")).method.name == "kd"  # the shipped file, by its name
    assert main(["configs", "copy", "cifar100/kd/resnet32x4_resnet8x4.yaml"]) == 0
    assert sorted(p.as_posix() for p in Path("configs").rglob("*.yaml")) == [
        "configs/cifar100/_base.yaml", "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"]
    assert main(["configs", "copy", "fashion_mnist/kd.yaml", "mine/kd.yaml"]) == 0
    assert (tmp_path / "mine" / "_base.yaml").is_file()
    assert main(["configs", "copy", "fashion_mnist/kd.yaml", "mine/kd.yaml"]) == 2  # never overwritten
    assert main(["configs", "copy", "no_such_config"]) == 2


def test_a_copied_sub_folder_resolves_its_bases_on_its_own(tmp_path, monkeypatch, capsys):
    """`configs copy cifar100/kd ./mycfg`: the folder's `base: ../_base.yaml` would point outside the copy, so the
    base comes into the copy and the lines naming it are rewritten; every copy then loads as the shipped config."""
    from distillab.config_files import PACKAGED_CONFIGS

    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", "cifar100/kd", "mycfg"]) == 0
    assert "(with mycfg/_base.yaml)" in capsys.readouterr().out
    assert not (tmp_path / "_base.yaml").exists()  # nothing written outside the destination
    copies = sorted((tmp_path / "mycfg").glob("*.yaml"))
    shipped = sorted((PACKAGED_CONFIGS / "cifar100" / "kd").glob("*.yaml"))
    assert [p.name for p in copies] == sorted(["_base.yaml", *(p.name for p in shipped)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for original in shipped:
        copy = tmp_path / "mycfg" / original.name
        assert "base: _base.yaml" in copy.read_text()
        assert load_config(copy).model_dump() == load_config(original).model_dump()
    assert main(["configs", "copy", "cifar100/kd/resnet56_resnet20.yaml", "one/x.yaml"]) == 0
    assert (elsewhere / "one" / "_base.yaml").is_file()
    assert load_config(elsewhere / "one" / "x.yaml").model_dump() == load_config(
        PACKAGED_CONFIGS / "cifar100" / "kd" / "resnet56_resnet20.yaml").model_dump()


def test_metrics_csv_and_a_missing_tracker_package_named_before_the_run_directory(config, tmp_path, monkeypatch):
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "tiny"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "test_acc" in rows[0] and len(rows) == 2
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert main(["train", str(config), "--set", "name=tracked", "--set", "train.trackers=[wandb]"]) == 2
    assert not (tmp_path / "runs" / "tracked").exists()  # no --force needed for the rerun


def test_trackers_record_epochs_steps_and_hyper_parameters(config, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    assert main(["train", str(config), "--set", "train.epochs=2", "--set", "train.log_steps=true",
                 "--set", "train.trackers=[tensorboard, wandb, mlflow]"]) == 0
    run = tmp_path / "runs" / "tiny"
    assert any((run / "tb").rglob("events.out.tfevents.*"))
    assert any((run / "wandb").glob("offline-run-*")) and wandb.run is None  # finished
    mlflow.set_tracking_uri((run / "mlruns").resolve().as_uri())
    (found,) = mlflow.search_runs(experiment_names=["distillab"], output_format="list")
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "test_acc")
    assert [m.step for m in history] == [1, 2] and "final_test_acc" in found.data.metrics
    assert found.data.params["train.epochs"] == "2" and found.data.params["method.name"] == "ce"
    assert mlflow.MlflowClient().get_metric_history(found.info.run_id, "step/ce")  # the per-step terms
