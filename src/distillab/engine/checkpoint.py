"""Checkpoints and weights: atomic writes, safe reads (`weights_only=True`), clear mismatch errors."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillab.errors import CheckpointError

STUDENT_FILE = "student.safetensors"
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename over `path`: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def describe_write_failure(exc: BaseException) -> str:
    """'no space left on device' and the like, from an OSError or torch's writer's RuntimeError."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc)
    return "no space left on device" if "No space left" in text or "enforce fail" in text else _first_line(exc)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint with `weights_only=True`; a truncated or foreign file is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt): {_first_line(exc)}") from None
    if not isinstance(state, dict) or "method" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not a distillab training checkpoint (no 'method'/'epoch' entries)")
    return state


def save_safetensors(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


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

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file: {_first_line(exc)}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: holds objects other than tensors, which weights_only=True refuses to "
                              f"unpickle: {_first_line(exc)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable weights file (truncated or corrupt): {_first_line(exc)}") from None
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
            raise CheckpointError(f"{where}: shape mismatch at {key!r}: file has {tuple(state[key].shape)}, "
                                  f"model expects {tuple(value.shape)}")
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


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()  # no terminal colour codes
    return text[0] if text else type(exc).__name__
