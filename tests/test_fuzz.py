"""Fuzzing the command line: random and mutated configs and `--set` overrides against a tiny digits run.

Every outcome must be a finished run or exit 2 with one line starting `distillab: error:`, never a traceback,
and a refused `--resume` must leave the existing run directory byte-identical.
"""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillab.cli import main

BASE = {"data": {"name": "digits", "val_size": 60, "train_subset": 64, "augment": {"flip": False}},
        "student": {"name": "resnet8"}, "method": {"name": "ce"},
        "train": {"epochs": 1, "batch_size": 32, "progress": False}}

junk = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True),
                 st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3))
cheap_int = st.one_of(st.integers(-2, 2), junk)  # keys whose large values would make a run long
FIELDS = {
    "seed": junk, "name": st.one_of(st.sampled_from(["ok", "..", ".", "a/b", "", "x" * 300]), junk),
    "train.epochs": cheap_int, "train.batch_size": st.one_of(st.sampled_from([1, 16, 64, 10 ** 6]), junk),
    "train.optim.lr": junk, "train.optim.name": st.one_of(st.sampled_from(["sgd", "adamw", "adam"]), junk),
    "train.optim.momentum": junk, "train.schedule.name": st.one_of(st.sampled_from(["step", "cosine"]), junk),
    "train.schedule.milestones": junk, "train.schedule.warmup_epochs": cheap_int, "train.device": junk,
    "train.amp": junk, "train.channels_last": junk, "train.checkpoint_every": cheap_int,
    "data.name": st.one_of(st.sampled_from(["digits", "synthetic", "imagenet"]), junk),
    "data.val_size": st.one_of(st.integers(-5, 2000), junk), "data.train_subset": cheap_int,
    "data.test_subset": cheap_int, "data.split_seed": junk, "data.augment.crop_padding": cheap_int,
    "data.synthetic.image_shape": st.one_of(st.lists(st.integers(-2, 9), min_size=0, max_size=4), junk),
    "data.synthetic.train_size": cheap_int, "data.synthetic.num_classes": cheap_int,
    "student.name": st.one_of(st.sampled_from(["resnet8", "resnet9", "vit_tiny"]), junk),
    "student.kwargs": st.one_of(st.dictionaries(st.sampled_from(["foo", "depth"]), junk, max_size=2), junk),
    "method.name": st.one_of(st.sampled_from(["ce", "kd", "nosuch"]), junk),
    "method.options": st.one_of(st.dictionaries(st.sampled_from(["label_smoothing", "x"]), junk, max_size=2), junk),
    "teacher": junk, "typo.field": junk, "train": junk,
}
overrides = st.lists(st.sampled_from(sorted(FIELDS)).flatmap(lambda k: FIELDS[k].map(lambda v: (k, v))),
                     max_size=3)


def as_set(key: str, value) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def check(code: int, err: str) -> None:
    assert code == 0 or (code == 2 and err.startswith("distillab: error:") and err.count("\n") == 1), (code, err)
    assert "Traceback" not in err


def snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))  # CI's bound; raise it for a deeper search


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize="FUZZ_EXAMPLES" not in os.environ)
@given(sets=overrides, drop=st.lists(st.sampled_from(["data", "student", "method", "train"]), max_size=1),
       as_text=st.booleans())
def test_random_configs_and_overrides_run_or_fail_in_one_line(sets, drop, as_text):
    with tempfile.TemporaryDirectory() as tmp:
        tree = {k: v for k, v in BASE.items() if k not in drop}
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump({**tree, "output_dir": str(Path(tmp) / "runs")}))
        argv = ["train", str(path)]
        for key, value in sets:
            argv += ["--set", as_set(key, value) if as_text else f"{key}={json.dumps(value)}"]
        check(*run(argv))


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize="FUZZ_EXAMPLES" not in os.environ)
@given(sets=overrides)
def test_a_refused_resume_leaves_the_run_untouched(finished_run, sets):
    before = snapshot(finished_run)
    argv = ["train", "--resume", str(finished_run)]
    for key, value in sets:
        argv += ["--set", as_set(key, value)]
    code, err = run(argv)
    check(code, err)
    if code == 2:
        assert snapshot(finished_run) == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp / "runs"), "name": "done"}))
    assert run(["train", str(path)])[0] == 0
    return tmp / "runs" / "done"


# -------------------------------------------------------------------- hand-edited checkpoints and run directories
CHECKPOINT_FIELDS = ["epoch", "step", "partial", "method", "method_extra", "optimizer", "scaler", "rng_cpu",
                     "rng_cuda", "run_id", "config", "config_sha256", "version"]
tensor_junk = st.builds(lambda n, dtype: torch.zeros(n, dtype=dtype), st.integers(0, 6000),
                        st.sampled_from([torch.uint8, torch.float32, torch.int64]))
checkpoint_edit = st.tuples(st.sampled_from(CHECKPOINT_FIELDS),
                            st.one_of(st.just("<delete>"), junk, tensor_junk, st.dictionaries(st.text(max_size=3),
                                                                                              junk, max_size=2)))
run_file_edit = st.tuples(st.sampled_from(["config.yaml", "metrics.jsonl", ".distillab-run", "summary.json"]),
                          st.sampled_from(["<delete>", "", "{", "[1, 2]", "epoch: x", '{"epoch": "1"}', "\x00\xff",
                                           "seed: true", "student: {name: 'module:os:getcwd'}", "a: &a [*a]"]))


def edit_run(run_dir: Path, checkpoint_edits, file_edits) -> None:
    import distillab.engine.checkpoint as ckpt

    path = run_dir / ckpt.CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    for field, value in checkpoint_edits:
        if value == "<delete>":
            state.pop(field, None)
        else:
            state[field] = value
    torch.save(state, path)
    for name, text in file_edits:
        if text == "<delete>":
            (run_dir / name).unlink(missing_ok=True)
        else:
            (run_dir / name).write_text(text, errors="surrogateescape")


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize="FUZZ_EXAMPLES" not in os.environ)
@given(checkpoint_edits=st.lists(checkpoint_edit, max_size=2), file_edits=st.lists(run_file_edit, max_size=2),
       command=st.sampled_from(["resume", "eval", "export", "report"]))
def test_hand_edited_checkpoints_and_run_directories_fail_in_one_line_and_lose_nothing(
        finished_run, checkpoint_edits, file_edits, command):
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "runs" / "done"
        shutil.copytree(finished_run, run_dir)
        edit_run(run_dir, checkpoint_edits, file_edits)
        before = snapshot(run_dir)
        argv = {"resume": ["train", "--resume", str(run_dir), "--set", "train.epochs=2"],
                "eval": ["eval", str(run_dir)],
                "export": ["export", str(run_dir), "--output", str(Path(tmp) / "out.safetensors")],
                "report": ["report", str(run_dir), "--output", str(Path(tmp) / "r.png")]}[command]
        code, err = run(argv)
        check(code, err)
        if code == 2 or command != "resume":
            assert snapshot(run_dir) == before
