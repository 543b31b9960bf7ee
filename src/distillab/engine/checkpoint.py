"""Checkpoints and weights: atomic writes, safe reads (`weights_only=True`), clear mismatch errors."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import pickle
import re
import uuid
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillab.errors import CheckpointError

STUDENT_FILE = "student.safetensors"
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"


def atomic_write(path: Path, write, replace: bool = True) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename over `path`: a crash never leaves half a file.

    With `replace=False` the file is only created: if `path` exists by then (another process wrote it since the
    caller checked), FileExistsError, and nothing is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # writers never share one
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _create(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` only if `path` does not exist, atomically where the file system has hard links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network file systems): claim the name, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, path)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def describe_write_failure(exc: BaseException) -> str:
    """'no space left on device' and the like, from an OSError or torch's writer's RuntimeError."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc)
    return "no space left on device" if "No space left" in text or "enforce fail" in text else first_line(exc)


def max_weights_bytes() -> int:
    """The most tensor bytes a weights or checkpoint file may claim: $DISTILLAB_MAX_WEIGHTS_GIB, by default
    16 GiB or the machine's memory, whichever is less. Checked before anything is allocated."""
    configured = os.environ.get("DISTILLAB_MAX_WEIGHTS_GIB")
    if configured:
        try:
            return int(float(configured) * 2**30)
        except ValueError:
            raise CheckpointError(f"DISTILLAB_MAX_WEIGHTS_GIB={configured!r} is not a number of GiB") from None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 << 30
    return min(16 << 30, memory)


def check_within_limit(path: Path, total: int, what: str) -> None:
    limit = max_weights_bytes()
    if total > limit:
        raise CheckpointError(f"{path}: its {what} take {total / 2**30:,.1f} GiB, over the {limit / 2**30:,.1f} GiB "
                              "limit (DISTILLAB_MAX_WEIGHTS_GIB)")


SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own bound


def check_safetensors_header(path: Path) -> None:
    """A safetensors file's header, read on its own: every tensor's size agrees with its dtype and shape and lies
    inside the file, and all of them together fit `max_weights_bytes()`; otherwise a CheckpointError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: unreadable safetensors file: its header length {n} does not fit the "
                                  f"file's {size:,} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors file: its header is not a mapping")
    total, data = 0, size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (begin, end) = entry["shape"], entry["data_offsets"]
            itemsize = SAFETENSORS_ITEMSIZE.get(entry["dtype"])  # None: a dtype newer than this table
            if not all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end]) or begin > end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: unreadable safetensors file: tensor {name!r} has a malformed header "
                                  "entry") from None
        if end > data or (itemsize is not None and end - begin != math.prod(shape) * itemsize):
            raise CheckpointError(f"{path}: unreadable safetensors file: tensor {name!r} claims bytes {begin}..{end} "
                                  f"for shape {shape}, which the file's {data:,} data bytes do not hold")
        total += end - begin
    check_within_limit(path, total, "tensors")


def check_archive_sizes(path: Path) -> None:
    """A torch.save zip archive's entries, before torch reads it: each lies inside the file and all of them
    together fit `max_weights_bytes()`. Files of the older, non-zip format are left to torch."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable archive (truncated or corrupt): {first_line(exc)}") from None
    size = path.stat().st_size
    if any(e.header_offset + e.compress_size > size for e in entries):
        raise CheckpointError(f"{path}: an entry of the archive lies past the end of the file (truncated or forged)")
    check_within_limit(path, sum(e.file_size for e in entries), "entries")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint with `weights_only=True`; a truncated or foreign file is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    check_archive_sizes(path)
    try:
        state = _torch_load(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt): {first_line(exc)}") from None
    if not isinstance(state, dict) or "method" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not a distillab training checkpoint (no 'method'/'epoch' entries)")
    return state


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of a resolved config's canonical JSON: what a checkpoint was trained with."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_training_state(state: Mapping[str, Any], path: Path) -> None:
    """Every field of a training checkpoint has its type and range (a CheckpointError naming the field otherwise),
    checked before anything is restored from it."""

    def refuse(field: str, problem: str) -> None:
        raise CheckpointError(f"{path}: {field} {problem} (an edited or foreign checkpoint)")

    def count(field: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            refuse(field, f"is {value!r}, not a count >= 0")

    def tensors(field: str, value: Any) -> None:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in value.items()):
            refuse(field, "is not a mapping of names to tensors")

    count("epoch", state["epoch"])
    count("step", state.get("step"))
    if not isinstance(state.get("run_id"), str) or not state["run_id"]:
        refuse("run_id", "is missing: every checkpoint names the run it belongs to")
    tensors("method", state.get("method"))
    for field in ("method_extra", "scaler"):
        if not isinstance(state.get(field), Mapping):
            refuse(field, "is missing or not a mapping")
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, Mapping) and isinstance(optimizer.get("state"), Mapping)
            and isinstance(optimizer.get("param_groups"), list)):
        refuse("optimizer", "is not an optimizer's state (state and param_groups)")
    rng, expected = state.get("rng_cpu"), torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != expected.dtype or rng.shape != expected.shape:
        refuse("rng_cpu", f"is not a generator state ({expected.numel()} bytes)")
    cuda = state.get("rng_cuda")
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        refuse("rng_cuda", "is not a list of generator states")
    partial = state.get("partial")
    if not isinstance(partial, Mapping):
        refuse("partial", "is not a mapping")
    if state["step"]:  # an epoch stopped half-way: its accumulators
        tensors("partial.sums", partial.get("sums"))
        tensors("partial.logs", partial.get("logs"))
        for field in ("correct", "seen"):
            count(f"partial.{field}", partial.get(field))
        if not isinstance(partial.get("elapsed"), (int, float)) or not 0 <= partial["elapsed"] < float("inf"):
            refuse("partial.elapsed", f"is {partial.get('elapsed')!r}, not seconds")
    config = state.get("config")
    if config is not None and (not isinstance(config, Mapping)
                               or state.get("config_sha256") != config_fingerprint(config)):
        refuse("config", "does not match its fingerprint config_sha256")


def _numpy_scalar_globals() -> list[Any]:
    """What unpickling a numpy scalar needs (published teacher checkpoints store their accuracy as one): the
    scalar reconstructor under its numpy 1 and 2 names, and the dtypes of plain numbers. No code runs but numpy's."""
    import numpy as np

    scalar = np.float64(0).__reduce__()[0]
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, without torch's warnings about what it refuses (the error says it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def save_safetensors(module: nn.Module, path: Path, metadata: dict[str, str] | None = None,
                     replace: bool = True) -> None:
    """The module's state dict as a safetensors file, written atomically (see `atomic_write` for `replace`); a
    failed write (a full disk) is an OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}

    def write(tmp: Path) -> None:
        try:
            save_file(state, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # the library's wrapper of an I/O error
            if "No space left" in str(exc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise OSError(errno.EIO, first_line(exc)) from None

    atomic_write(path, write, replace)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a run directory (its student.safetensors), a .safetensors file, or a .pt/.pth file.

    A .pt/.pth may hold a bare state dict or one under "model", "net" or "state_dict" (RepDistiller and
    mdistiller teacher checkpoints keep it under "model"; RepDistiller's `*_last.pth` also pickles its argparse
    options, which are allowed and ignored: nothing else is unpickled).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / STUDENT_FILE
        if not file.is_file():
            unfinished = (path / CHECKPOINT_FILE).is_file()
            why = "has not finished (resume it first)" if unfinished else f"holds no {STUDENT_FILE}"
            raise CheckpointError(f"{path}: run directory {why}")
        path = file
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_safetensors_header(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file: {first_line(exc)}") from None
    check_archive_sizes(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_scalar_globals()]):
            obj = _torch_load(path)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: holds objects other than tensors, which weights_only=True refuses to "
                              f"unpickle: {first_line(exc)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable weights file (truncated or corrupt): {first_line(exc)}") from None
    for key in ("model", "net", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(obj)


def load_weights(model: nn.Module, path: Path, what: str = "model") -> str:
    """Load weights into `model` strictly; the error names the first mismatching key. Returns the file's SHA-256."""
    from distillab.models.peer_layouts import to_zoo_layout  # models import this module

    where = f"{what} weights {path}"
    state = to_zoo_layout(model, read_state_dict(path), where)
    check_state_dict(model, state, where)
    model.load_state_dict(state, strict=True)
    file = Path(path).expanduser()
    return sha256(file / STUDENT_FILE if file.is_dir() else file)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"{where}: missing key {key!r} (does the architecture match "
                                  f"{type(model).__name__}?)")
        if tuple(state[key].shape) != tuple(value.shape):
            others = [k for k, v in expected.items()
                      if k != key and k in state and tuple(state[k].shape) != tuple(v.shape)]
            also = "".join(f"; also {k!r}: file has {tuple(state[k].shape)}, model expects {tuple(expected[k].shape)}"
                           for k in others[:2]) + (f"; and {len(others) - 2} more" if len(others) > 2 else "")
            raise CheckpointError(f"{where}: shape mismatch at {key!r}: file has {tuple(state[key].shape)}, "
                                  f"model expects {tuple(value.shape)}{also}")
        if value.is_floating_point() and not state[key].is_floating_point():
            raise CheckpointError(f"{where}: {key!r} is {state[key].dtype} in the file; the model's is "
                                  f"{value.dtype} (weights must be floating point)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{where}: unexpected key {extra[0]!r} (does the architecture match "
                              f"{type(model).__name__}?)")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()  # no terminal colour codes
    return text[0] if text else type(exc).__name__
