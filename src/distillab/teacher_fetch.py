"""`distillab teachers fetch NAME`: download a published teacher (or read the file given with `--from`), check its
SHA-256 where a public source gives one, take the checkpoint out of a tar release, convert it to our layout (the
rules of `distillab convert`, `models/peer_layouts.py`) and write `<cache>/NAME.safetensors` atomically. The
registry of names is `distillab.published`."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distillab import models
from distillab.engine.checkpoint import describe_write_failure, load_weights, save_safetensors
from distillab.engine.checkpoint import sha256 as file_sha256
from distillab.errors import CheckpointError, DistillabError
from distillab.published import PublishedTeacher, cache_dir, get

if TYPE_CHECKING:
    from rich.console import Console

TIMEOUT_S = 60.0


@dataclass
class Fetched:
    """What `fetch` did: the weights file to use, the checkpoint's SHA-256 and whether it was checked."""

    entry: PublishedTeacher
    path: Path
    sha256: str | None
    verified: bool
    action: str  # "shipped", "cached" (fetched before) or "fetched"


def fetch(name: str, source: Path | None = None, sha256: str | None = None, force: bool = False,
          console: Console | None = None) -> Fetched:
    """Download (or read `source`), check, extract, convert and store the published teacher `name`."""
    entry = get(name)
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise DistillabError(f"--sha256 {sha256!r}: expected 64 lowercase hex digits")
    if entry.shipped:
        if source is not None:
            raise DistillabError(f"{name} ships with distillab: there is nothing to fetch (drop --from)")
        return Fetched(entry, entry.path(), entry.sha256, True, "shipped")
    out = entry.path()
    if out.exists() and not force and source is None:
        return Fetched(entry, out, None, False, "cached")
    downloaded = None
    if source is None:
        assert entry.url is not None
        downloaded = cache_dir() / "downloads" / entry.download_name
        if not (entry.tar_release and downloaded.is_file() and not force):  # a tar serves all its teachers
            download(entry.url, downloaded, console, hint=f"distillab teachers fetch {name} --from FILE")
        source = downloaded
    elif not Path(source).expanduser().is_file():
        raise DistillabError(f"--from {source}: no such file")
    expected = sha256 or entry.sha256
    with _checkpoint_file(entry, Path(source).expanduser()) as checkpoint:
        digest = file_sha256(checkpoint)
        if expected is not None and digest != expected:
            which = "the --sha256 given" if sha256 else "the recorded one"
            raise CheckpointError(f"{name}: the checkpoint's SHA-256 is {digest}, not {which} {expected}: a different "
                                  "or damaged file" + (f" (delete {downloaded} to download it again)" if downloaded
                                                       else "") + "; if you trust it, pass --sha256 " + digest)
        model = models.build(entry.model, num_classes=entry.num_classes, in_channels=entry.in_channels,
                             **entry.kwargs)
        load_weights(model, checkpoint, f"published teacher {name}")  # `distillab convert`'s rules, key by key
    metadata = {"model": entry.model, "published": name, "source": entry.url or "", "source_sha256": digest,
                "sha256_verified": str(expected is not None).lower()}
    try:
        save_safetensors(model, out, metadata=metadata)
    except OSError as exc:
        raise DistillabError(f"{describe_write_failure(exc)} while writing {out}") from None
    if downloaded is not None and not entry.tar_release:
        downloaded.unlink(missing_ok=True)  # converted: the original is no longer needed
    return Fetched(entry, out, digest, expected is not None, "fetched")


@contextmanager
def _checkpoint_file(entry: PublishedTeacher, path: Path) -> Iterator[Path]:
    """The checkpoint itself: `path`, or its member taken out of a tar (into a temporary file) where `path` is a
    tar. Only the one regular file the entry names is read; nothing is extracted by the archive's paths."""
    if not tarfile.is_tarfile(path):  # (not zipfile.is_zipfile: a tar of torch files ends like a zip file)
        if entry.tar_release and path.suffix == ".tar":
            raise CheckpointError(f"{path}: not a readable tar archive (a damaged download? delete it and fetch "
                                  "again)")
        yield path
        return
    assert entry.member is not None
    try:
        with tarfile.open(path) as archive:
            member = next((m for m in archive.getmembers()
                           if m.name == entry.member or m.name.endswith("/" + entry.member)), None)
            if member is None or not member.isfile():
                raise CheckpointError(f"{path}: the tar holds no file {entry.member} (is it {entry.source}'s "
                                      "release?)")
            cache_dir().mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".pth", dir=cache_dir())
            with os.fdopen(fd, "wb") as out, archive.extractfile(member) as data:
                shutil.copyfileobj(data, out, 1 << 20)
    except (tarfile.TarError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable tar archive (truncated or damaged): {exc}") from None
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def download(url: str, dest: Path, console: Console | None, hint: str) -> Path:
    """Fetch `url` into `dest` atomically (a temporary file beside it, then a rename), with a progress bar. A
    network failure is one line naming the URL and `hint`, the command that takes a file placed by hand (a failure
    to write, a full disk, stays an OSError)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress(TextColumn(f"downloading {dest.name}"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
                task = progress.add_task("", total=total)
                while block := response.read(1 << 20):
                    out.write(block)
                    progress.advance(task, len(block))
            if total is not None and out.tell() != total:
                raise ConnectionError(f"the connection closed after {out.tell():,} of {total:,} bytes")
        os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc  # HTTP errors are URLErrors; ValueError: not a URL
        raise DistillabError(f"could not download {url}: {reason}; download it by hand (a browser, another "
                             f"machine) and run `{hint}`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest
