"""Fashion-MNIST (Zalando): 60000 train + 10000 test grayscale 28x28 images of 10 clothing classes.

Files are looked for, in order, in the Debian package folder (`apt-get install dataset-fashion-mnist`),
then in `root`, `root/fashion_mnist` and `root/FashionMNIST/raw`; each file may be gzipped
(`*.gz`) or plain. The first folder holding all four files is used. Otherwise, when `download` is
true, the official files are fetched into `root`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distillab.data.base import DataSplits, ImageDataset
from distillab.data.download import download as fetch
from distillab.data.idx import read_idx_pair
from distillab.data.registry import register
from distillab.errors import DataError

NUM_CLASSES = 10
# Per-channel statistics of the 60000 training images on the 0..1 scale (exact: 0.28604, 0.35302).
MEAN = (0.2860,)
STD = (0.3530,)

SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Official md5s of the gzipped files as published (a repackaged copy may be compressed differently).
FILES = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
_PARTS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def candidate_dirs(root: str | Path | None) -> list[Path]:
    """Folders searched for the files, in order."""
    dirs = list(SYSTEM_DIRS)
    if root is not None:
        root = Path(root).expanduser()
        dirs += [root, root / "fashion_mnist", root / "FashionMNIST" / "raw"]
    return dirs


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _locate(dirs: list[Path]) -> dict[str, Path] | None:
    for folder in dirs:
        found = {stem: _find(folder, stem) for stem in FILES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _missing_message(dirs: list[Path], root: str | Path | None, why: str) -> str:
    where = ", ".join(str(d) for d in dirs) or "any folder"
    names = ", ".join(f"{stem}.gz" for stem in FILES)
    hint = "" if root is not None else " (no data.root set, so nothing could be downloaded)"
    return (f"Fashion-MNIST files not found in {where}{hint}{why}; install them with "
            f"`apt-get install dataset-fashion-mnist` or set data.root to a folder holding {names}")


def load_fashion_mnist(root: str | Path | None = None, download: bool = True) -> DataSplits:
    """Fashion-MNIST as uint8 1x28x28 tensors: DataSplits(train (60000), val=None, test (10000))."""
    dirs = candidate_dirs(root)
    paths = _locate(dirs)
    if paths is None:
        if root is None or not download:
            raise DataError(_missing_message(dirs, root, "" if root is None else " and download is off"))
        target = Path(root).expanduser()
        try:
            for stem, md5 in FILES.items():
                if _find(target, stem) is None:
                    fetch(BASE_URL + f"{stem}.gz", target / f"{stem}.gz", md5)
        except DataError as exc:
            raise DataError(_missing_message(dirs, root, f", and the download failed ({exc})")) from exc
        paths = _locate([target])
        assert paths is not None
    parts = {}
    for split, (images_stem, labels_stem) in _PARTS.items():
        images, labels = read_idx_pair(paths[images_stem], paths[labels_stem])
        if labels.size and labels.max() >= NUM_CLASSES:
            raise DataError(f"{paths[labels_stem]}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
        parts[split] = ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                                    torch.from_numpy(labels.astype("int64")), NUM_CLASSES, MEAN, STD,
                                    f"fashion_mnist/{split}")
    return DataSplits(parts["train"], None, parts["test"])


register("fashion_mnist")(lambda cfg: load_fashion_mnist(cfg.root, cfg.download))
