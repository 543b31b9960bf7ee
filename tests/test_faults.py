"""Faults and bad input: kill -9, SIGTERM, corrupt checkpoints, NaN losses, and one-line errors."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import teacher_changes, tiny_config
from distillab import methods
from distillab.cli import main
from distillab.config_files import load_config
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from distillab.engine.trainer import NonFiniteLossError
from distillab.run import train_run

# six cosine epochs over the whole training split (1300 images once 137 are held out), flips on: long enough to
# be killed mid-run, and resumed with the augmentation's random state
RUN = ("data.val_size=137", "data.train_subset=", "data.augment.flip=true", "train.epochs=6", "train.batch_size=32",
       "train.schedule.name=cosine")


def write_config(tmp_path, name: str):
    return tiny_config(tmp_path, name, *RUN)


def final_weights(run_dir):
    state = load_checkpoint(run_dir / CHECKPOINT_FILE)
    assert state["epoch"] == 6 and state["step"] == 0
    return state["method"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 6-epoch run, trained in a child process like the interrupted ones."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, "ref")
    subprocess.run([sys.executable, "-m", "distillab", "train", str(cfg)], check=True, capture_output=True)
    return final_weights(tmp / "runs" / "ref")


def start(cfg):
    return subprocess.Popen([sys.executable, "-m", "distillab", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=600.0):  # a hang guard, not a speed check: generous for a loaded machine
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def resume(run_dir):
    proc = subprocess.run([sys.executable, "-m", "distillab", "train", "--resume", str(run_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_the_uninterrupted_weights(tmp_path, reference):
    cfg = write_config(tmp_path, "killed")
    run_dir = tmp_path / "runs" / "killed"
    proc = start(cfg)
    wait_for(run_dir / CHECKPOINT_FILE, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # it really died mid-run
    resume(run_dir)
    assert_same_weights(final_weights(run_dir), reference)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]  # no epoch recorded twice


@pytest.mark.slow
def test_sigterm_writes_a_resumable_checkpoint(tmp_path, reference):
    cfg = write_config(tmp_path, "stopped")
    run_dir = tmp_path / "runs" / "stopped"
    proc = start(cfg)
    wait_for(run_dir / CHECKPOINT_FILE, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at epoch" in err and "distillab train --resume" in err
    state = load_checkpoint(run_dir / CHECKPOINT_FILE)
    assert state["epoch"] < 6
    resume(run_dir)
    assert_same_weights(final_weights(run_dir), reference)


def test_checkpoint_truncated_mid_file_is_refused_and_kept(tmp_path, capsys):
    cfg = write_config(tmp_path, "trunc")
    assert main(["train", str(cfg), "--set", "train.epochs=1"]) == 0
    ckpt = tmp_path / "runs" / "trunc" / CHECKPOINT_FILE
    ckpt.write_bytes(ckpt.read_bytes()[:-1000])
    before = snapshot(tmp_path / "runs" / "trunc")
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "runs" / "trunc"), "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "unreadable checkpoint (truncated or corrupt)" in err and err.count("\n") == 1
    assert snapshot(tmp_path / "runs" / "trunc") == before


class NanAfterFirstEpoch(methods.Method):
    """Cross-entropy that turns NaN from the second epoch on (for the NaN guard test)."""

    requires_teacher = False

    def forward(self, images, labels):
        logits = self.student(images)
        ce = F.cross_entropy(logits, labels)
        return logits, {"ce": ce * float("nan") if self.epoch >= 1 else ce}


methods.register("test_nan_after_first_epoch")(NanAfterFirstEpoch)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = load_config(write_config(tmp_path, "nan"), ["method.name=test_nan_after_first_epoch"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2, by step \d+ \(terms ce=nan\)"):
        train_run(cfg)
    state = load_checkpoint(cfg.run_dir / CHECKPOINT_FILE)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tmp, "done")
    assert main(["train", str(cfg), "--set", "train.epochs=1"]) == 0
    return tmp, cfg


def bad_inputs(tmp, cfg):
    """(arguments, expected fragment of the one-line error)."""
    run = tmp / "runs" / "done"
    teacher = run / "student.safetensors"
    trunc = tmp / "truncated.safetensors"
    trunc.write_bytes(teacher.read_bytes()[:100])
    empty = tmp / "empty_cifar"
    empty.mkdir(exist_ok=True)
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("student: {name: resnet8\n")
    kd = ["--set", "method.name=kd", "--set", "teacher.name=resnet8", "--set", "name=kd"]
    return [
        (["train", str(tmp / "missing.yaml")], "missing.yaml does not exist"),
        (["train", str(bad_yaml)], "not valid YAML"),
        (["train", str(cfg), "--set", "trian.epochs=2"], "trian: unknown key; did you mean 'train'?"),
        (["train", str(cfg), "--set", "train.epochs=-3"], "train.epochs: Input should be greater than 0"),
        (["train", str(cfg), "--set", "train.epochs=ten"], "train.epochs: Input should be a valid integer"),
        (["train", str(cfg), "--force", "--set", "train.batch_size=5000"], "train.batch_size=5000 exceeds the 1300"),
        (["train", str(cfg), "--force", "--set", "student.name=resnet88"], "unknown model 'resnet88'; did you mean"),
        (["train", str(cfg), "--force", "--set", "method.name=fitnett"], "unknown method 'fitnett'; did you mean"),
        (["train", str(cfg), "--force", *kd, "--set", "method.options.temprature=2", "--set",
          f"teacher.checkpoint={run}"], "method.options.temprature: unknown key; did you mean 'temperature'?"),
        (["train", str(cfg), "--force", "--set", "data.val_size=5000"], "data.val_size=5000 must be smaller"),
        (["train", str(cfg), *kd, "--set", f"teacher.checkpoint={tmp / 'nope.pt'}"], "weights file not found"),
        (["train", str(cfg), *kd, "--set", f"teacher.checkpoint={trunc}"], "unreadable safetensors file"),
        (["train", str(cfg), *kd, "--set", "teacher.name=resnet20", "--set", f"teacher.checkpoint={run}"],
         "missing key 'stages.0.1.conv1.weight'"),
        (["train", str(cfg), "--force", "--set", "data.name=cifar100", "--set", f"data.root={empty}",
          "--set", "data.download=false"], "CIFAR-100"),
        (["train", "--resume", str(tmp / "runs" / "never")], "not a run directory"),
        (["train", str(cfg)], "already exists: pass --resume to continue it or --force"),
        (["train", str(cfg), "--set", "train.epochs"], "expected key=value"),
        (["train", str(cfg), "--set", "train.schedule.name=step", "--set", "train.schedule.milestones=[2, 9]"],
         "lie beyond epochs=6"),
        (["train", str(cfg), "--set", "data.name=imagenet"], "data.name: unknown dataset 'imagenet'"),
        (["bench", "suite", str(tmp / "suite.yaml"), "--seeds", "0"], "--seeds must be at least 1"),
        (["eval", str(tmp / "runs" / "never")], "not a run directory"),
    ]


def test_bad_inputs_give_one_clear_line_and_lose_nothing(finished_run, capsys):
    tmp, cfg = finished_run
    run = tmp / "runs" / "done"
    before = snapshot(run)
    cases = bad_inputs(tmp, cfg)
    assert len({tuple(args) for args, _ in cases}) == len(cases)  # no command line checked twice
    for args, fragment in cases:
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert fragment in err, (args, err)
        assert err.count("\n") == 1 and err.startswith("distillab: error: "), (args, err)
        assert snapshot(run) == before, args
    assert not (tmp / "runs" / "kd").exists()  # failed starts leave no half-made run behind


def teacher_file(tmp_path, mutate=None, name="teacher.safetensors"):
    from safetensors.torch import save_file

    from distillab import models

    state = models.build("resnet8", num_classes=10, in_channels=1).state_dict()
    if mutate is not None:
        state = mutate(state)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def kd_config(tmp_path, teacher, *extra):
    return tiny_config(tmp_path, "kd", "method.name=kd", *teacher_changes(teacher, "resnet8"), *extra)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: {k: v.long() if v.is_floating_point() else v for k, v in s.items()}, "is torch.int64 in the file"),
    (lambda s: {k: v.fill_(float("nan")) if k == "head.fc.weight" else v for k, v in s.items()}, "NaN or infinite"),
])
def test_a_broken_teacher_is_refused_on_load(tmp_path, capsys, mutate, message):
    teacher = teacher_file(tmp_path, mutate)
    assert main(["train", str(kd_config(tmp_path, teacher))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "kd").exists()


def test_a_teacher_whose_sha256_differs_from_the_config_is_refused(tmp_path, capsys, untrained_digits_teacher):
    from distillab.engine.checkpoint import sha256

    teacher = untrained_digits_teacher  # it trains at the end: a teacher above chance
    good = sha256(teacher)
    assert main(["train", str(kd_config(tmp_path, teacher, f"teacher.sha256='{'0' * 64}'"))]) == 2
    err = capsys.readouterr().err
    assert f"SHA-256 {good} is not the expected teacher.sha256" in err
    assert main(["train", str(kd_config(tmp_path, teacher, f"teacher.sha256='{good}'"))]) == 0
