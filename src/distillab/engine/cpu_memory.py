"""Keep freed memory inside the process on CPU (glibc malloc), so training steps stop page-faulting.

By default glibc serves large blocks (activations of a few MB and up) with fresh `mmap` pages and hands them
back on free, and it trims the top of the heap. A distillation step frees the teacher's activations while the
student's are still alive, so every step pays for zero-filling new pages. On the 2-core development CPU
(resnet32x4 -> resnet8x4, batch 64) that made a kd step about 10 % slower than a student step plus a teacher
forward measured apart. With the freed memory kept, it matches them.

The cost: the process keeps its peak heap until it exits instead of returning memory to the system, which is
what a training process does anyway. glibc falls back to `mmap` by itself when the heap cannot grow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc malloc not to use `mmap` for large blocks and never to trim the heap; once per process.

    Returns whether it applied (False off Linux or without glibc). `distillab train` (`run.train_run`) and
    `bench throughput` call it for CPU runs; a Python user who builds a Trainer directly may call it first.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):
        return False
