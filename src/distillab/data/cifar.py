"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the official "python version" pickles.

Layout under `root`: `cifar-10-batches-py/{data_batch_1..5, test_batch}` or
`cifar-100-python/{train, test}` (the folder the official tarball extracts to). Each file is a pickled
dict with bytes keys: b"data" is an N x 3072 uint8 array, each row the red, green and blue 32x32
planes one after the other, each plane row-major; labels are b"labels" (CIFAR-10) or b"fine_labels"
(CIFAR-100). Pickles are read with an unpickler that only accepts numpy arrays and plain values.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from distillab.data.base import DataSplits, ImageDataset
from distillab.data.download import check_md5, download
from distillab.data.registry import register
from distillab.errors import DataError, DistillabWarning

Which = Literal["cifar10", "cifar100"]


@dataclass(frozen=True)
class CifarSpec:
    title: str
    folder: str
    url: str
    archive_md5: str
    train: tuple[tuple[str, str], ...]  # (file name, official md5)
    test: tuple[tuple[str, str], ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]


SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
         ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
         ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        "labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        "fine_labels", 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
    ),
}

_PIXELS = 3 * 32 * 32


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays/scalars and builtin containers: a data file cannot run code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy 2 moved it; avoids the deprecation shim
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images N x 3 x 32 x 32 uint8 and labels N int64 of one pickled batch, validated."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # truncated or corrupt pickles raise many different types
        raise DataError(f"{path}: not a readable CIFAR pickle (truncated or corrupt): "
                        f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise DataError(f"{path}: no {key!r} entry (keys: {sorted(map(str, batch))}); "
                            "is this the right CIFAR variant?")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (_PIXELS,):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be an N x {_PIXELS} uint8 array, found "
                        f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {label_key!r} has shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found "
                        f"{labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _find_folder(root: Path, spec: CifarSpec) -> Path | None:
    """`root/<folder>`, or `root` itself, when it holds every file of the dataset."""
    names = [name for name, _ in spec.train + spec.test]
    for folder in (root / spec.folder, root):
        if all((folder / name).is_file() for name in names):
            return folder
    return None


def _inside(name: str, folder: str) -> bool:
    parts = Path(name).parts
    return parts[:1] == (folder,) and ".." not in parts


def _extract(archive: Path, root: Path, spec: CifarSpec) -> None:
    """Extract only regular files below `spec.folder` (no links, no absolute or `..` paths)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _inside(m.name, spec.folder)]
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **kwargs)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot extract: {exc}") from exc


def _fetch(root: Path, spec: CifarSpec, verify_md5: bool) -> None:
    archive = root / spec.archive
    if not archive.is_file():
        download(spec.url, archive, spec.archive_md5)
    elif verify_md5:
        check_md5(archive, spec.archive_md5, "; delete it to download it again, or set data.verify_md5=false")
    _extract(archive, root, spec)


def load_cifar(root: str | Path | None, which: Which = "cifar10", download: bool = True,
               verify_md5: bool = True) -> DataSplits:
    """CIFAR-10 or CIFAR-100 as uint8 3x32x32 tensors: DataSplits(train (50000), val=None, test (10000)).

    Missing files are downloaded into `root` (official tarball, md5-checked, then extracted) when
    `download` is true. With `verify_md5` every file must match its official md5.
    """
    if which not in SPECS:
        raise DataError(f"unknown CIFAR variant {which!r}; expected one of {sorted(SPECS)}")
    spec = SPECS[which]
    if root is None:
        raise DataError(f"{spec.title} needs a folder: set data.root to the folder holding (or receiving) "
                        f"{spec.folder}/")
    root = Path(root).expanduser()
    folder = _find_folder(root, spec)
    if folder is None:
        if not download:
            raise DataError(f"{spec.title} files not found in {root / spec.folder} and download is off; "
                            f"download {spec.url} and extract it in {root}, or set data.download=true")
        try:
            _fetch(root, spec, verify_md5)
        except DataError as exc:
            raise DataError(f"{spec.title} files not found in {root / spec.folder}: {exc}; download "
                            f"{spec.url} by hand and extract it in {root}") from exc
        folder = _find_folder(root, spec)
        if folder is None:
            raise DataError(f"{root / spec.archive}: extracted, but {spec.folder}/ lacks some of the "
                            "expected files; delete the archive to download it again")
    if not verify_md5:
        warnings.warn(f"{spec.title} in {folder}: md5 check off (data.verify_md5: false), so these files are not "
                      "known to be the official release; figures from them may not compare with published ones",
                      DistillabWarning, stacklevel=2)
    parts = {}
    for split, files in (("train", spec.train), ("test", spec.test)):
        images, labels = [], []
        for name, md5 in files:
            path = folder / name
            if verify_md5:
                check_md5(path, md5, "; delete it (and re-download), restore the original file, or set "
                          "data.verify_md5=false to use this copy anyway")
            x, y = _read_batch(path, spec.label_key, spec.num_classes)
            images.append(x)
            labels.append(y)
        parts[split] = ImageDataset(torch.from_numpy(np.concatenate(images)),
                                    torch.from_numpy(np.concatenate(labels)), spec.num_classes, spec.mean,
                                    spec.std, f"{which}/{split}")
    return DataSplits(parts["train"], None, parts["test"])


register("cifar10")(lambda cfg: load_cifar(cfg.root, "cifar10", cfg.download, cfg.verify_md5))
register("cifar100")(lambda cfg: load_cifar(cfg.root, "cifar100", cfg.download, cfg.verify_md5))
