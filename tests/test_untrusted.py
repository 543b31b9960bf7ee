"""Trust nothing on disk: exports that never overwrite, resumes that verify, configs that are code only when the
user says so, bounded inputs. Each case is one line on stderr, exit code 2, and nothing lost."""

import errno
import json
import os
import signal
import struct
import subprocess
import sys

import pytest
import torch

from distillab.cli import main
from distillab.config_files import load_config
from distillab.engine.checkpoint import CHECKPOINT_FILE, STUDENT_FILE, load_checkpoint, save_checkpoint
from distillab.run import RUN_MARKER, train_run
from test_records import one_line, snapshot

RUN = ("data: {name: digits, val_size: 100, train_subset: 256, augment: {flip: false, crop_padding: 0}}\n"
       "student: {name: resnet8}\nmethod: {name: ce}\n"
       "train: {epochs: 2, batch_size: 64, progress: false}\n")


def write_config(tmp_path, name: str, text: str = RUN):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\nname: {name}\n{text}")
    return path


def refused(capsys, argv, fragment: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line(capsys)
    assert fragment in err, err
    return err


@pytest.fixture
def finished(tmp_path):
    assert main(["train", str(write_config(tmp_path, "done"))]) == 0
    return tmp_path / "runs" / "done"


# -------------------------------------------------------------------------------------- 1. export never overwrites
def test_export_never_writes_over_a_runs_files_nor_into_another_run(finished, tmp_path, capsys):
    other = tmp_path / "runs" / "other"
    other.mkdir()
    (other / RUN_MARKER).write_text("run_id: x\n")
    (other / STUDENT_FILE).write_bytes(b"another run's student")
    before, theirs = snapshot(finished), snapshot(other)
    refused(capsys, ["export", str(finished), "--output", str(other / STUDENT_FILE), "--force"],
            "inside the run directory")
    refused(capsys, ["export", str(finished), "--output", str(other / "new.safetensors")], "inside the run directory")
    refused(capsys, ["export", str(finished), "--output", str(finished / CHECKPOINT_FILE), "--force"],
            "inside the run's checkpoints folder")
    for name in ("config.yaml", STUDENT_FILE, "summary.json"):
        refused(capsys, ["export", str(finished), "--output", str(finished / name), "--force"],
                "one of the run's own files")
    refused(capsys, ["convert", str(finished), str(other / STUDENT_FILE), "--model", "resnet8", "--num-classes", "10",
                     "--in-channels", "1", "--force"], "inside the run directory")
    assert snapshot(finished) == before and snapshot(other) == theirs
    assert main(["train", "--resume", str(finished), "--set", "train.epochs=3"]) == 0  # its checkpoint still resumes


def test_export_replaces_an_existing_file_only_with_force(finished, tmp_path, capsys):
    mine = tmp_path / "notes.safetensors"
    mine.write_text("keep me")
    refused(capsys, ["export", str(finished), "--output", str(mine)], "exists: pass --force")
    assert mine.read_text() == "keep me"
    assert main(["export", str(finished), "--output", str(mine), "--force"]) == 0
    assert mine.read_bytes() != b"keep me"
    assert main(["export", str(finished)]) == 0  # the default file, beside the run's files
    refused(capsys, ["export", str(finished)], "exists: pass --force")
    assert main(["export", str(finished), "--force"]) == 0  # an earlier export is replaced when told


# ------------------------------------------------------------------- 2. --force validates before it deletes
def test_force_on_a_finished_staged_run_with_a_refused_config_deletes_nothing(tmp_path, capsys):
    from test_dfa import dfa_config

    config = dfa_config(tmp_path)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "dfa"
    before = snapshot(run)
    # 400 training images fit a batch of 250, but the search's two halves (200 each) do not
    refused(capsys, ["train", str(config), "--force", "--set", "train.batch_size=250"], "exceeds the 200 training")
    assert snapshot(run) == before


def test_force_with_a_missing_teacher_deletes_nothing(finished, tmp_path, capsys):
    before = snapshot(finished)
    refused(capsys, ["train", str(write_config(tmp_path, "done")), "--force", "--set", "method.name=kd",
                     "--set", "teacher.name=resnet8", "--set", f"teacher.checkpoint={tmp_path / 'none.pt'}"],
            "weights file not found")
    assert snapshot(finished) == before


def test_a_moved_staged_run_resumes_its_final_stage(tmp_path, capsys):
    """The final method's options point into the run's stages (DFA's aggregation.json): they move with it."""
    from test_dfa import dfa_config

    assert main(["train", str(dfa_config(tmp_path))]) == 0
    moved = tmp_path / "elsewhere" / "dfa"
    moved.parent.mkdir()
    (tmp_path / "runs" / "dfa").rename(moved)
    assert main(["train", "--resume", str(moved), "--set", "train.epochs=2"]) == 0
    assert load_checkpoint(moved / CHECKPOINT_FILE)["epoch"] == 2


# ---------------------------------------------------------- 3. resume compares with the checkpoint's own config
@pytest.mark.parametrize(("edit", "key"), [("lr: 0.05", "train.optim.lr"), ("seed: 0", "seed"),
                                            ("train_subset: 256", "data.train_subset")])
def test_an_edited_config_yaml_does_not_change_a_resumed_run(finished, capsys, edit, key):
    config = finished / "config.yaml"
    field, value = edit.split(": ")
    new = {"lr": "0.5", "seed": "3", "train_subset": "200"}[field]
    text = config.read_text()
    assert f"{field}: {value}\n" in text
    config.write_text(text.replace(f"{field}: {value}\n", f"{field}: {new}\n", 1))
    before = snapshot(finished)
    err = refused(capsys, ["train", "--resume", str(finished), "--set", "train.epochs=3"],
                  "differs from the config the checkpoint was trained with")
    assert key in err
    assert snapshot(finished) == before


def test_a_checkpoint_from_an_older_release_resumes_despite_fields_added_since(tmp_path):
    """A field (or method option) the checkpoint's release did not have is its default, not a change; a field it
    had that no longer exists is still one."""
    from distillab.errors import DistillabError
    from distillab.run import resolved_config, resume_changes

    cfg = load_config(write_config(tmp_path, "kd", RUN.replace("name: ce", "name: kd")))
    older = resolved_config(cfg)
    del older["imports"]
    del older["method"]["options"]["temperature"]
    assert resume_changes(older, cfg, "the checkpoint") == []
    older["retired_field"] = 1
    with pytest.raises(DistillabError, match="retired_field differs from the checkpoint"):
        resume_changes(older, cfg, "the checkpoint")


def test_a_checkpoint_records_its_resolved_config_and_fingerprint(finished):
    from distillab.engine.checkpoint import config_fingerprint
    from distillab.run import resolved_config

    state = load_checkpoint(finished / CHECKPOINT_FILE)
    assert state["config"] == resolved_config(load_config(finished / "config.yaml"))
    assert state["config_sha256"] == config_fingerprint(state["config"]) and len(state["run_id"]) == 32
    assert state["config"]["method"]["options"] == {"ce_weight": 1.0, "label_smoothing": 0.0}  # defaults filled


# ------------------------------------------------------------------------------- 4. claim, then check
def test_a_run_finished_by_another_process_after_the_check_is_not_trained_again(tmp_path, monkeypatch):
    """Process B passes its checks while the run does not exist; A trains it to the end before B reaches the
    lock. B must find it finished under the lock and refuse, not append a second set of epochs."""
    import distillab.run as run_module

    config = write_config(tmp_path, "raced")
    run_dir = tmp_path / "runs" / "raced"
    other: list[subprocess.CompletedProcess] = []
    load_splits = run_module.load_splits

    def other_process_first(data_cfg):
        if not other:
            other.append(subprocess.run([sys.executable, "-m", "distillab", "train", str(config)],
                                        capture_output=True, text=True))
        return load_splits(data_cfg)

    monkeypatch.setattr(run_module, "load_splits", other_process_first)
    train_run(load_config(config))
    # this process holds the lock while it loads the data: the other one is refused and trains nothing
    assert other[0].returncode == 2 and "is in use by pid" in other[0].stderr, other[0].stderr
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_suite_run_found_finished_under_the_lock_is_left_as_it_is(finished):
    before = snapshot(finished)
    cfg = load_config(finished / "config.yaml")
    summary = train_run(cfg, skip_finished=True)
    assert summary == json.loads((finished / "summary.json").read_text())
    assert snapshot(finished) == before


def test_a_refused_run_leaves_no_directory_behind(tmp_path, capsys):
    refused(capsys, ["train", str(write_config(tmp_path, "nope")), "--set", "train.batch_size=5000"],
            "exceeds the 256 training images")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------- 5. configs as code
@pytest.fixture
def run_with_code(finished, tmp_path):
    """A run directory received from someone else: its config names a module: factory that runs a command."""
    marker = tmp_path / "MARKER"
    config = finished / "config.yaml"
    text = config.read_text().replace("name: resnet8\n", "name: module:os:system\n  kwargs:\n"
                                      f"    command: touch {marker}\n", 1)
    assert "module:os:system" in text
    config.write_text(text.replace("  kwargs: {}\n", "", 1))
    return finished, marker


@pytest.mark.parametrize("argv", [["eval"], ["export"], ["train", "--resume"]])
def test_a_run_directorys_config_runs_no_code_unless_allowed(run_with_code, capsys, argv):
    run, marker = run_with_code
    before = snapshot(run)
    err = refused(capsys, [*argv, str(run)], "student.name 'module:os:system' imports and runs code")
    assert "--allow-code" in err
    assert not marker.exists() and snapshot(run) == before


def test_allow_code_lets_a_trusted_run_directory_build_its_module_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "from distillab import models\n\ndef small(num_classes, in_channels):\n"
        "    return models.build('resnet8', num_classes=num_classes, in_channels=in_channels)\n")  # roles and all
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_config(tmp_path, "mine", RUN.replace("name: resnet8", "name: 'module:my_models:small'"))
    assert main(["train", str(config)]) == 0  # a config given on the command line is the user's own
    run = tmp_path / "runs" / "mine"
    refused(capsys, ["eval", str(run)], "--allow-code")
    assert main(["eval", str(run), "--allow-code"]) == 0
    assert main(["eval", str(run), "--set", "student.name=module:my_models:small"]) == 0  # named by the user


# ------------------------------------------------------------------------------- 6. bounded YAML
def test_a_62_alias_yaml_bomb_is_refused_by_its_expanded_size(tmp_path, capsys):
    chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 32))
    assert chain.count("*") == 62
    path = tmp_path / "bomb.yaml"
    path.write_text(chain + "student: {name: resnet8}\n")
    refused(capsys, ["train", str(path)], "YAML expands to more than 100,000 nodes")


def test_deep_nesting_and_duplicate_keys_are_refused(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("student: " + "[" * 50_000 + "]" * 50_000 + "\n")
    refused(capsys, ["train", str(deep)], "YAML nested more than 64 levels deep")
    twice = write_config(tmp_path, "twice", RUN + "seed: 1\nseed: 2\n")
    refused(capsys, ["train", str(twice)], "key 'seed' appears twice in one mapping")


# ------------------------------------------------------------------------------- 7. bounded weights files
def sparse_safetensors(path, tensor_bytes: int = 64 << 30):
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [tensor_bytes // 4],
                                          "data_offsets": [0, tensor_bytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + tensor_bytes)  # a few bytes on disk, 64 GiB by its size
    return path


def test_a_sparse_file_claiming_64_gib_is_refused_before_allocation(finished, tmp_path, capsys):
    weights = sparse_safetensors(tmp_path / "huge.safetensors")
    refused(capsys, ["convert", str(weights), str(tmp_path / "out.safetensors"), "--model", "resnet8"],
            "over the 16.0 GiB limit")
    refused(capsys, ["train", str(write_config(tmp_path, "t")), "--set", "method.name=kd", "--set",
                     "teacher.name=resnet8", "--set", f"teacher.checkpoint={weights}"], "GiB limit")


def test_a_safetensors_header_that_claims_bytes_past_the_file_is_refused(tmp_path, capsys):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 40)
    refused(capsys, ["convert", str(path), str(tmp_path / "o.safetensors"), "--model", "resnet8"],
            "which the file's 40 data bytes do not hold")


def test_the_weights_limit_is_configurable(tmp_path, monkeypatch, capsys):
    from distillab import models
    from distillab.engine.checkpoint import save_safetensors

    path = tmp_path / "r8.safetensors"
    save_safetensors(models.build("resnet8", num_classes=100), path)
    monkeypatch.setenv("DISTILLAB_MAX_WEIGHTS_GIB", "0.0001")  # ~107 kB: under resnet8's 311 kB
    refused(capsys, ["convert", str(path), str(tmp_path / "o.safetensors"), "--model", "resnet8"],
            "limit (DISTILLAB_MAX_WEIGHTS_GIB)")


# ------------------------------------------------------ 8. a run is never shortened past its checkpoint
def test_a_mid_epoch_checkpoint_is_not_resumed_with_fewer_epochs(tmp_path, capsys):
    from distillab.engine.trainer import TrainingStopped

    config = write_config(tmp_path, "cut", RUN.replace("epochs: 2", "epochs: 3"))

    def stop_soon(epoch, _record):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops at the next step of epoch 2

    with pytest.raises(TrainingStopped):
        train_run(load_config(config), on_epoch_end=stop_soon)
    run = tmp_path / "runs" / "cut"
    state = load_checkpoint(run / CHECKPOINT_FILE)
    assert (state["epoch"], state["step"]) == (1, 1)
    before = snapshot(run)
    refused(capsys, ["train", "--resume", str(run), "--set", "train.epochs=1"],
            "at epoch 1, step 1, past the end of train.epochs=1: set train.epochs to at least 2")
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and summary["test_acc"] == records[-1]["test_acc"]


# ---------------------------------------------------- 9. read-only and full file systems: one line
def test_a_read_only_lock_file_system_is_one_line(finished, monkeypatch, capsys):
    import distillab.engine.lock as lock

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock.os, "open", read_only)
    before = snapshot(finished)
    refused(capsys, ["train", "--resume", str(finished), "--set", "train.epochs=3"], "read-only file system")
    refused(capsys, ["train", str(finished.parent.parent / "done.yaml"), "--force"], "read-only file system")
    assert snapshot(finished) == before


@pytest.mark.parametrize("format", ["safetensors", "onnx"])
def test_a_full_disk_while_exporting_is_one_line(finished, tmp_path, monkeypatch, capsys, format):
    import distillab.engine.checkpoint as checkpoint

    if format == "onnx":
        pytest.importorskip("onnxscript")

    def full(path, write, replace=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write", full)
    monkeypatch.setattr("distillab.export.atomic_write", full)
    refused(capsys, ["export", str(finished), "--format", format, "--output", str(tmp_path / f"s.{format}")],
            "no space left on device while writing")
    assert not (tmp_path / f"s.{format}").exists()


def test_report_refuses_a_file_it_did_not_write_and_a_full_disk_is_one_line(finished, tmp_path, monkeypatch,
                                                                            capsys):
    mine = tmp_path / "holiday.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n not a figure of ours")
    refused(capsys, ["report", str(finished), "--output", str(mine)], "not a figure distillab wrote")
    assert mine.read_bytes().endswith(b"not a figure of ours")
    figure = tmp_path / "report.png"
    assert main(["report", str(finished), "--output", str(figure)]) == 0
    assert main(["report", str(finished), "--output", str(figure)]) == 0  # its own figure is redrawn
    assert main(["report", str(finished), "--output", str(mine), "--force"]) == 0

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("distillab.bench.plots.atomic_write", full)
    refused(capsys, ["report", str(finished), "--output", str(tmp_path / "r2.png")], "no space left on device")


# ------------------------------------------------------------- 10. a checkpoint is validated as a schema
def edit_checkpoint(run, edit):
    path = run / CHECKPOINT_FILE
    state = load_checkpoint(path)
    edit(state)
    save_checkpoint(state, path)


CHECKPOINT_EDITS = {
    "no run id": (lambda s: s.pop("run_id"), "run_id is missing"),
    "empty run id": (lambda s: s.update(run_id=""), "run_id is missing"),
    "no scaler": (lambda s: s.pop("scaler"), "scaler is missing"),
    "huge step": (lambda s: s.update(step=10 ** 12, partial={"sums": {}, "logs": {}, "correct": 0, "seen": 0,
                                                             "elapsed": 0.0}), "lies past the 4 steps of an epoch"),
    "bad rng": (lambda s: s.update(rng_cpu=torch.zeros(7, dtype=torch.uint8)), "rng_cpu is not a generator state"),
    "epoch 999": (lambda s: s.update(epoch=999), "at epoch 999, past the end of train.epochs=3"),
    "epoch -5": (lambda s: s.update(epoch=-5), "epoch is -5, not a count"),
    "epoch as text": (lambda s: s.update(epoch="2"), "epoch is '2', not a count"),
    "edited config": (lambda s: s["config"].update(seed=9), "config does not match its fingerprint"),
    "optimizer junk": (lambda s: s.update(optimizer=[1, 2]), "optimizer is not an optimizer's state"),
    "weights junk": (lambda s: s.update(method={"x": 1}), "method is not a mapping of names to tensors"),
    "partial junk": (lambda s: s.update(step=1, partial={"seen": -1}), "partial.sums is not a mapping"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_EDITS))
def test_a_hand_edited_checkpoint_is_refused_before_anything_is_restored(finished, capsys, case):
    edit, fragment = CHECKPOINT_EDITS[case]
    edit_checkpoint(finished, edit)
    before = snapshot(finished)
    refused(capsys, ["train", "--resume", str(finished), "--set", "train.epochs=3"], fragment)
    assert snapshot(finished) == before


# ------------------------------------------------------------------------------- smaller ones
@pytest.mark.parametrize(("overrides", "fragment"), [
    (["student.kwargs.num_classes=5"], "num_classes comes from the data, not from kwargs"),
    (["seed=true"], "seed: a boolean is not a number"),
    (["train.epochs=false"], "train.epochs: a boolean is not a number"),
    (["data.augment.crop_padding=9"], "crop_padding=9 exceeds the images' side (8 pixels)"),
    (["data.augment.crop_padding=100000"], "data.augment.crop_padding: Input should be less than or equal to 4096"),
    (["data.name=synthetic", "data.synthetic.image_shape=[3, 100000, 100000]"],
     "data.synthetic.image_shape.1: Input should be less than or equal to 4096"),
    (["data.name=synthetic", "data.synthetic.train_size=100000000"], "over the 4 GiB limit of synthetic data"),
    (["student.name=module:torch.nn:Identity"], "model 'module:torch.nn:Identity' (Identity) has no parameters"),
    (["student.name=module:torch.nn:Linear"], "failed to build or to run on a 1x8x8 input: TypeError"),
])
def test_smaller_bad_inputs_are_one_line(tmp_path, capsys, overrides, fragment):
    argv = ["train", str(write_config(tmp_path, "bad"))]
    for item in overrides:
        argv += ["--set", item]
    refused(capsys, argv, fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("argv", "fragment"), [
    (["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--device", "gpu"],
     "device 'gpu': choose auto, cpu, cuda or cuda:N"),
    (["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--input", "3x99999x99999"],
     "at most 64 channels and 4096 pixels a side"),
    (["configs", "copy", "/etc/hostname"], "is not a shipped config"),
    (["configs", "copy", "../../../../etc/hostname"], "is not a shipped config"),
    (["demo", "--seeds", "0"], "--seeds must be at least 1"),
])
def test_smaller_bad_commands_are_one_line(tmp_path, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, fragment)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing trained


def test_a_metrics_line_with_a_non_numeric_epoch_is_one_line(finished, tmp_path, capsys):
    metrics = finished / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0].replace('"epoch": 1', '"epoch": "one"'), *lines[1:]]) + "\n")
    before = snapshot(finished)
    refused(capsys, ["train", "--resume", str(finished), "--set", "train.epochs=3"], "line 1 is not an epoch's record")
    refused(capsys, ["report", str(finished), "--output", str(tmp_path / "r.png")], "line 1 is not an epoch's record")
    assert snapshot(finished) == before


def test_a_hand_edited_run_config_of_any_shape_reports_without_a_traceback(finished, tmp_path, capsys):
    (finished / "config.yaml").write_text("method: kd\nstudent: [1, 2]\ntrain: 3\n")
    assert main(["report", str(finished), "--output", str(tmp_path / "r.png")]) == 0
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------- found by the adversarial pass (benchmarks/adversarial)
def test_a_truncated_checkpoint_is_named_as_such(finished, capsys):
    path = finished / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:5000])
    refused(capsys, ["train", "--resume", str(finished), "--set", "train.epochs=3"],
            f"{path}: unreadable checkpoint (truncated or corrupt)")


def test_a_file_created_meanwhile_is_not_replaced_without_force(tmp_path):
    from distillab import models
    from distillab.engine.checkpoint import save_safetensors

    path = tmp_path / "w.safetensors"
    path.write_text("written by another process after our check")
    with pytest.raises(FileExistsError):
        save_safetensors(models.build("resnet8", num_classes=10), path, replace=False)
    assert path.read_text() == "written by another process after our check"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


def test_a_full_disk_inside_the_safetensors_library_is_one_line(finished, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    refused(capsys, ["convert", str(finished), str(tmp_path / "c.safetensors"), "--model", "resnet8",
                     "--num-classes", "10", "--in-channels", "1"], "no space left on device while writing")
    refused(capsys, ["export", str(finished), "--output", str(tmp_path / "e.safetensors")],
            "no space left on device while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.yaml", "runs"]


def test_a_throughput_batch_too_large_to_hold_is_one_line(capsys):
    refused(capsys, ["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--batch", "1000000000"],
            "over the 4 GiB limit of synthetic data")


def test_an_onnx_export_prints_nothing_but_its_result(finished, tmp_path, capfd):
    pytest.importorskip("onnxscript")
    capfd.readouterr()
    assert main(["export", str(finished), "--format", "onnx", "--output", str(tmp_path / "s.onnx")]) == 0
    assert capfd.readouterr().err == ""


def test_a_raw_pickle_teacher_is_refused_in_one_line_and_runs_nothing(tmp_path, capsys):
    import pickle

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights = tmp_path / "teacher.pt"
    weights.write_bytes(pickle.dumps({"conv1.weight": Payload()}, protocol=4))
    refused(capsys, ["train", str(write_config(tmp_path, "p")), "--set", "method.name=kd", "--set",
                     "teacher.name=resnet8", "--set", f"teacher.checkpoint={weights}"], str(weights))
    assert not marker.exists()
