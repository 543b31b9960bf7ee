"""Tiny real runs on scikit-learn's digits through the same path as `distillab train`."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import teacher_changes, tiny_run
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from distillab.engine.trainer import NonFiniteLossError
from distillab.errors import CheckpointError, ConfigError, DistillabError
from distillab.run import load_run_config, train_run

# the whole training split less 200 for validation, two epochs: enough for a resnet8 to learn digits
RUN = ("data.val_size=200", "data.train_subset=", "train.epochs=2", "train.schedule.name=cosine")


def config(tmp_path, *extra, name="run"):
    return tiny_run(tmp_path, name, *RUN, *extra)


def test_ce_run_writes_its_files_and_learns(tmp_path):
    cfg = config(tmp_path, "method.name=ce", "train.epochs=3")
    summary = train_run(cfg)
    run = cfg.run_dir
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "student.safetensors", CHECKPOINT_FILE):
        assert (run / f).is_file(), f
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert summary["test_acc"] > 30.0  # chance is 10%
    # the summary's val_acc is the last epoch's, and best_val is the epoch of the highest val_acc recorded
    best = max(lines, key=lambda r: r["val_acc"])
    assert summary["val_acc"] == lines[-1]["val_acc"]
    assert summary["best_val"] == {k: best[k] for k in ("epoch", "val_acc", "test_acc")}


def test_kd_run_records_the_teacher(tmp_path, digits_teacher):
    cfg = config(tmp_path, "method.name=kd", *teacher_changes(digits_teacher))
    summary = train_run(cfg)
    teacher_file = (digits_teacher / "student.safetensors").read_bytes()
    assert summary["teacher_sha256"] == hashlib.sha256(teacher_file).hexdigest()
    assert summary["teacher_test_acc"] > 30.0


def weights(run_dir):
    return load_checkpoint(run_dir / CHECKPOINT_FILE)["method"]


class Interrupt(Exception):
    pass


def interrupt_after_first_epoch(epoch, record):
    if epoch == 1:
        raise Interrupt


@pytest.mark.parametrize("method", ["ce", "fitnet"])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, digits_teacher, method):
    extra = [f"method.name={method}"]
    if method != "ce":
        extra += teacher_changes(digits_teacher)
    full = config(tmp_path, *extra, name="full")
    train_run(full)
    cut = config(tmp_path, *extra, name="cut")
    with pytest.raises(Interrupt):
        train_run(cut, on_epoch_end=interrupt_after_first_epoch)
    assert load_checkpoint(cut.run_dir / CHECKPOINT_FILE)["epoch"] == 1
    train_run(load_run_config(cut.run_dir), resume=True)
    a, b = weights(full.run_dir), weights(cut.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_file(str(full.run_dir / "student.safetensors")).keys() == {
        k.removeprefix("student.") for k in a if k.startswith("student.")
    }
    lines = (cut.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_existing_run_is_not_overwritten_without_force(tmp_path):
    cfg = config(tmp_path, "method.name=ce", "train.epochs=1")
    train_run(cfg)
    with pytest.raises(DistillabError, match=r"--resume .* or --force"):
        train_run(cfg)
    train_run(cfg, force=True)


def test_nan_loss_stops_the_run_naming_step_and_terms(tmp_path):
    cfg = config(tmp_path, "method.name=ce", "train.optim.lr=1e30", "train.epochs=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 1, by step \d+ \(terms ce=nan"):
        train_run(cfg)


def test_teacher_checkpoint_mismatch_names_the_key(tmp_path, digits_teacher):
    cfg = config(tmp_path, "method.name=kd", *teacher_changes(digits_teacher, "resnet20"))
    with pytest.raises(CheckpointError, match=r"teacher weights .*: (missing|unexpected) key 'stages"):
        train_run(cfg)


def test_teacher_checkpoint_shape_mismatch_names_the_key(tmp_path, digits_teacher):
    state = load_file(str(digits_teacher / "student.safetensors"))
    state["head.fc.weight"] = torch.zeros(3, state["head.fc.weight"].shape[1])
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    cfg = config(tmp_path, "method.name=kd", *teacher_changes(bad))
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'head.fc.weight'"):
        train_run(cfg)


def test_truncated_checkpoint_is_refused(tmp_path):
    cfg = config(tmp_path, "method.name=ce", "train.epochs=1")
    train_run(cfg)
    ckpt = cfg.run_dir / CHECKPOINT_FILE
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ckpt)


def test_teacherless_kd_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="needs a teacher"):
        train_run(config(tmp_path, "method.name=kd"))


def test_a_method_built_for_other_inputs_than_the_data_is_one_clear_error():
    from distillab import methods, models
    from distillab.data import load_digits
    from distillab.engine.trainer import Trainer

    student = models.build("resnet8", num_classes=10, in_channels=1)
    teacher = models.build("resnet14", num_classes=10, in_channels=1)
    method = methods.build("reviewkd", student, teacher)  # shapes inferred for the default 32x32
    with pytest.raises(DistillabError, match=r"built for 1x32x32 inputs but the data are 1x8x8: build it with "
                                             r"input_shape=\(1, 8, 8\)"):
        Trainer(method, load_digits())


def test_train_deterministic_sets_torch_and_cudnn_and_otherwise_the_autotuner(tmp_path):
    try:
        train_run(config(tmp_path, "method.name=ce", "train.deterministic=true", "train.epochs=1"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        train_run(config(tmp_path, "method.name=ce", "train.epochs=1", "name=fast"))
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False


def test_amp_auto_is_off_on_the_cpu_and_explicit_dtypes_pass_through():
    from distillab.engine.trainer import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16


def test_a_users_callback_sees_every_named_point_of_the_loop(tmp_path):
    """on_fit_start, on_batch (typed batches, every step), on_epoch_end (the record written), on_fit_end (the
    summary returned), in that order; on_fit_error instead of on_fit_end when the fit fails."""
    from distillab.data import load_splits
    from distillab.data.batch import Batch
    from distillab.engine.callbacks import Callback
    from distillab.engine.trainer import Trainer
    from distillab.run import build_method

    class Recorder(Callback):
        def __init__(self, fail_at=None):
            self.calls, self.fail_at = [], fail_at

        def on_fit_start(self, trainer):
            self.calls.append("start")

        def on_batch(self, trainer, batches):
            assert all(isinstance(b, Batch) and b.indices is None and b.strong is None for b in batches)
            self.calls.append(batches[0].size)

        def on_epoch_end(self, trainer, record):
            self.calls.append(("epoch", record["epoch"]))
            if record["epoch"] == self.fail_at:
                raise Interrupt

        def on_fit_end(self, trainer, summary):
            self.calls.append(("end", summary["epochs"]))

        def on_fit_error(self, trainer):
            self.calls.append("error")

    cfg = config(tmp_path, "method.name=ce", "data.train_subset=100", "train.batch_size=50", "train.drop_last=true")
    data = load_splits(cfg.data)
    for fail_at, tail in ((None, [("end", 2)]), (1, ["error"])):
        method, _ = build_method(cfg, data)
        recorder = Recorder(fail_at)
        trainer = Trainer(method, data, cfg.train, augment=None, callbacks=[recorder])
        if fail_at is None:
            trainer.fit()
        else:
            with pytest.raises(Interrupt):
                trainer.fit()
        epochs = [["start"]] + [[50, 50, ("epoch", e)] for e in (1, 2)[:fail_at or 2]]
        assert recorder.calls == [c for part in epochs for c in part] + tail
