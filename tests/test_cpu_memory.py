"""CPU allocator setting applied by the trainer (engine/cpu_memory.py)."""

import platform

import pytest

from distillab import methods, models
from distillab.config import TrainConfig
from distillab.data.digits import load_digits
from distillab.engine import cpu_memory
from distillab.engine import trainer as trainer_module
from distillab.engine.cpu_memory import keep_freed_memory


def test_keep_freed_memory_sets_both_malloc_options_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    assert keep_freed_memory() and keep_freed_memory()
    assert calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2^31 - 1, once per process


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_options():
    assert cpu_memory._mallopt(-4, 0) and cpu_memory._mallopt(-1, 2**31 - 1)


def test_cpu_trainer_applies_it(monkeypatch):
    applied = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: applied.append(True))
    student = models.build("resnet8", num_classes=10, in_channels=1)
    method = methods.build("ce", student, input_shape=(1, 8, 8))
    trainer_module.Trainer(method, load_digits(), TrainConfig(device="cpu"))
    assert applied == [True]
