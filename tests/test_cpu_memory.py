"""CPU allocator setting (engine/cpu_memory.py), applied by a training run, not by building a Trainer."""

import platform

import pytest
import torch

from conftest import tiny_run
from distillab import methods, models
from distillab import run as run_module
from distillab.config import TrainConfig
from distillab.data.digits import load_digits
from distillab.engine import cpu_memory
from distillab.engine import trainer as trainer_module
from distillab.engine.cpu_memory import keep_freed_memory
from distillab.errors import DistillabError


def test_keep_freed_memory_sets_both_malloc_options_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    assert keep_freed_memory() and keep_freed_memory()
    assert calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2^31 - 1, once per process


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_options():
    assert cpu_memory._mallopt(-4, 0) and cpu_memory._mallopt(-1, 2**31 - 1)


def test_building_a_trainer_has_no_process_wide_side_effects(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append("process group"))
    student = models.build("resnet8", num_classes=10, in_channels=1)
    method = methods.build("ce", student, input_shape=(1, 8, 8))
    trainer_module.Trainer(method, load_digits(), TrainConfig(device="cpu"))
    assert calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun launch nobody joined: named, not started behind one's back
    with pytest.raises(DistillabError, match=r"has not joined the process group: call .*init_world"):
        trainer_module.Trainer(method, load_digits(), TrainConfig(device="cpu"))
    assert calls == []


def test_a_cpu_training_run_applies_it(monkeypatch, tmp_path):
    applied = []
    monkeypatch.setattr(run_module, "keep_freed_memory", lambda: applied.append(True))
    cfg = tiny_run(tmp_path, "r", "data.train_subset=64", "train.batch_size=32")
    run_module.train_run(cfg)
    assert applied == [True]
