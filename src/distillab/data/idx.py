"""Reader of the IDX format of MNIST-style datasets, plain or gzip-compressed.

An IDX file is a big-endian header (two zero bytes, a type code, the number of dimensions, then one
uint32 size per dimension) followed by the raw array. Only unsigned bytes (type 0x08) are used here:
labels have magic 0x00000801 (one dimension), images 0x00000803 (count x rows x cols).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from distillab.errors import DataError

LABELS_MAGIC = 0x00000801
IMAGES_MAGIC = 0x00000803
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip data (detected by content, not by name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def _read_idx(path: str | Path, magic: int, kind: str) -> np.ndarray:
    path = Path(path)
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX {kind} file: only {len(data)} bytes")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path}: not an IDX {kind} file: magic number 0x{found:08X}, expected 0x{magic:08X}")
    if len(data) < header_len:
        raise DataError(f"{path}: truncated: the IDX header needs {header_len} bytes, the file holds "
                        f"{len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    body = len(data) - header_len
    expected = int(np.prod(dims, dtype=np.int64))
    if body != expected:
        what = (f"{dims[0]} images of {dims[1]}x{dims[2]}" if kind == "images" else f"{dims[0]} labels")
        problem = "truncated" if body < expected else "trailing data"
        raise DataError(f"{path}: {problem}: header says {what} but holds {body} bytes of data "
                        f"(expected {expected})")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """uint8 array N x rows x cols from an IDX images file (magic 0x00000803)."""
    return _read_idx(path, IMAGES_MAGIC, "images")


def read_idx_labels(path: str | Path) -> np.ndarray:
    """uint8 array N from an IDX labels file (magic 0x00000801)."""
    return _read_idx(path, LABELS_MAGIC, "labels")


def read_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels, checking that both files describe the same number of examples."""
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: holds {len(labels)} labels but {images_path} holds "
                        f"{len(images)} images")
    return images, labels
