"""Data-parallel training: 2 gloo processes on the CPU follow the 1-process run with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from distillab.config_files import load_config
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoBatchNormNet(nn.Module):
    """BatchNorm statistics are per process without SyncBatchNorm (CUDA only), so the exact equivalence is
    checked on a network without BN: what is under test is sharding, gradient averaging and reductions."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.body(x)


def worker(rank: int, world_size: int, port: int, out: str, extra: tuple[str, ...] = ()) -> None:
    from distillab import models
    from distillab.run import train_run

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    models.register("nobn_net")(NoBatchNormNet)
    cfg = load_config(None, [
        "data.name=digits", "data.val_size=137", "data.augment.crop_padding=1", "data.augment.flip=true",
        "train.epochs=2", "train.batch_size=100", "train.schedule.name=cosine", "train.optim.lr=0.1",
        "train.progress=false", "train.log_steps=true", f"output_dir={out}", "name=run", "method.name=ce", *extra,
    ], base={"student": {"name": "nobn_net"}})
    train_run(cfg)
    if world_size > 1:
        torch.distributed.destroy_process_group()


def run(world_size: int, out, extra: tuple[str, ...] = ()) -> list[dict]:
    mp.spawn(worker, args=(world_size, free_port(), str(out), extra), nprocs=world_size, join=True)
    return [json.loads(line) for line in (out / "run" / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_follow_one_process_step_by_step(tmp_path):
    one = run(1, tmp_path / "one")
    two = run(2, tmp_path / "two")
    assert len(one) == len(two) == 2 * 13  # 1300 training images / global batch 100, 2 epochs
    for a, b in zip(one, two, strict=True):
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        assert abs(a["ce"] - b["ce"]) < 1e-4, (a, b)
    wa = load_checkpoint(tmp_path / "one" / "run" / CHECKPOINT_FILE)["method"]
    wb = load_checkpoint(tmp_path / "two" / "run" / CHECKPOINT_FILE)["method"]
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-4), key
    ma = [json.loads(x) for x in (tmp_path / "one" / "run" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "two" / "run" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ma, mb, strict=True):  # distributed evaluation covers each image once
        assert abs(ra["test_acc"] - rb["test_acc"]) <= 100 / 360 + 1e-9  # at most one borderline image
        assert abs(ra["val_acc"] - rb["val_acc"]) <= 100 / 137 + 1e-9
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], abs=1e-4)
    summary = json.loads((tmp_path / "two" / "run" / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2


@pytest.mark.slow
def test_two_processes_from_cached_teacher_views_follow_one_process(tmp_path):
    """kd from 3 cached views per image: each rank builds the whole cache and reads its own images' rows."""
    from conftest import fit_to_digits
    from distillab.engine.checkpoint import save_safetensors

    torch.manual_seed(7)
    save_safetensors(fit_to_digits(NoBatchNormNet()), tmp_path / "teacher.safetensors")  # above chance
    extra = ("method.name=kd", "teacher.name=nobn_net", f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
             "train.teacher_views=3")
    one, two = run(1, tmp_path / "one", extra), run(2, tmp_path / "two", extra)
    assert len(one) == len(two) == 2 * 13
    for a, b in zip(one, two, strict=True):
        assert abs(a["kd"] - b["kd"]) < 1e-4 and abs(a["ce"] - b["ce"]) < 1e-4, (a, b)
    for out in ("one", "two"):
        assert json.loads((tmp_path / out / "run" / "summary.json").read_text())["teacher_cache_s"] > 0
        assert len(list((tmp_path / out / "run" / "teacher_views").iterdir())) == 3


@pytest.mark.slow
def test_torchrun_launches_the_cli_with_two_processes(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\nname: ddp\nstudent: {{name: resnet8}}\nmethod: {{name: ce}}\n"
                   "data: {name: digits, val_size: 137, train_subset: 600, augment: {flip: false}}\n"
                   "train: {epochs: 1, batch_size: 64, progress: false}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "distillab", "train", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 writes alone
    assert proc.stdout.count("epoch 1/1") == 1 and proc.stdout.count("done:") == 1  # rank 0 prints alone


@pytest.mark.slow
def test_a_bad_batch_under_torchrun_is_one_line_from_rank_0(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\nname: odd\nstudent: {{name: resnet8}}\nmethod: {{name: ce}}\n"
                   "data: {name: digits, val_size: 137, train_subset: 600}\n"
                   "train: {epochs: 1, batch_size: 63, progress: false}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "distillab", "train", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "distillab: error:" in line]
    assert len(ours) == 1 and "must be divisible by the 2 processes" in ours[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split("distillab: error:")[0]  # no rank's traceback before it


def test_memory_bank_method_refuses_data_parallel_training(monkeypatch):
    from distillab import methods, models
    from distillab.data import load_digits
    from distillab.engine import trainer as trainer_module
    from distillab.engine.distributed import World
    from distillab.errors import DistillabError

    monkeypatch.setattr(trainer_module, "current_world", lambda: World(rank=0, world_size=2))
    teacher = models.build("resnet8", num_classes=10, in_channels=1)
    student = models.build("resnet8", num_classes=10, in_channels=1)
    method = methods.build("crd", student, teacher, input_shape=(1, 8, 8), num_negatives=16)
    with pytest.raises(DistillabError, match="method 'crd' keeps per-process state"):
        trainer_module.Trainer(method, load_digits())


def test_data_parallel_leaves_the_frozen_teacher_out(tmp_path):
    """The teacher's parameters are not reduced and its buffers not broadcast; the student's buffers are."""
    import torch.distributed as dist

    from distillab import methods, models
    from distillab.engine.trainer import data_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        method = methods.build("kd", models.build("resnet8", 10, 1), models.build("resnet8", 10, 1),
                               input_shape=(1, 8, 8))
        ddp = data_parallel(method, torch.device("cpu"))
        teacher = {id(t) for t in [*method.teacher.parameters(), *method.teacher.buffers()]}
        student_buffers = {id(b) for b in method.student.buffers()}
        broadcast = {id(b) for b in ddp.modules_buffers}
        assert not teacher & broadcast and student_buffers <= broadcast
        assert all(name.startswith("teacher.") for name in ddp.parameters_to_ignore)
        assert len(ddp.parameters_to_ignore) == len(teacher)
    finally:
        dist.destroy_process_group()
