"""Devices: resolving `train.device`, the autocast dtype, a device's name for records, and DDP wrapping."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distillab.errors import DistillabError

if TYPE_CHECKING:
    from distillab.methods.base import Method


def resolve_device(name: str) -> torch.device:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise DistillabError(f"device {name!r}: choose auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillabError(f"train.device={name!r} but CUDA is not available; use cpu or auto")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.amp`: auto is bf16 on a CUDA device that supports it, fp16 (with a gradient
    scaler) on one that does not, off on the CPU; an explicit bf16 on a GPU without it is refused."""
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if amp == "auto":
        return None if device.type != "cuda" else torch.bfloat16 if bf16_ok else torch.float16
    if amp == "bf16" and not bf16_ok:
        raise DistillabError(f"train.amp=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use "
                             "amp: fp16 (or auto, which picks it)")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def data_parallel(method: Method, device: torch.device, find_unused_parameters: bool = False,
                  ) -> torch.nn.parallel.DistributedDataParallel:
    """`method` wrapped in DDP with its frozen teacher left out: the teacher's parameters are not in the gradient
    reducer and its buffers (BN statistics, identical on every rank and never updated) are not broadcast each
    step. The student's and the side modules' buffers still come from rank 0 at every forward."""
    teacher = [f"teacher.{name}" for name, _ in itertools.chain(method.teacher.named_parameters(),
                                                              method.teacher.named_buffers())
               ] if method.teacher is not None else []
    # torch's (private, long-standing) hook for this; tests/test_distributed.py pins its effect
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, teacher)
    return torch.nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo where there is one) and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"
