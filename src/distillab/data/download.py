"""Checksums and downloads of dataset files (standard library only)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from distillab.errors import DataError

TIMEOUT_S = 60.0


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex md5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path, expected: str, hint: str = "") -> None:
    """Raise DataError naming `path` when its md5 differs from `expected`."""
    actual = md5sum(path)
    if actual != expected:
        raise DataError(f"{path}: md5 {actual} differs from the official {expected}: the file is corrupt or "
                        f"not the official release{hint}")


def download(url: str, dest: Path, md5: str | None = None) -> Path:
    """Fetch `url` into `dest` atomically (temp file, then rename), checking `md5` when given.

    Network failures raise DataError; nothing is left at `dest` unless the download completed and matched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while block := response.read(1 << 20):
                out.write(block)
        if md5 is not None:
            actual = md5sum(tmp)
            if actual != md5:
                raise DataError(f"{url}: downloaded file has md5 {actual}, expected {md5}; try again later")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:  # URLError, timeouts and HTTP errors are OSErrors
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"could not download {url} to {dest}: {reason}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest
