"""scikit-learn's bundled handwritten digits: 1797 grayscale 8x8 images of 10 classes, no download.

Pixels hold 17 gray levels 0..16, scaled to 0..255 (v * 255 / 16, rounded). The train/test split is
fixed: stratified by class, each class giving its share (largest remainder) of 360 test images, chosen
with a torch generator seeded with 0, so 1437 train / 360 test everywhere. Mean/std come from the train
part.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from distillab.data.base import DataSplits, ImageDataset
from distillab.data.registry import register

NUM_CLASSES = 10
TEST_SIZE = 360
SPLIT_SEED = 0


def _stratified_test_index(labels: torch.Tensor, test_size: int, seed: int) -> torch.Tensor:
    """Sorted indices of a stratified test set of exactly `test_size` examples."""
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    exact = counts.double() * test_size / len(labels)
    quota = exact.floor().long()
    short = test_size - int(quota.sum())
    # give the remaining places to the classes with the largest fractional parts (stable: lower class first)
    order = torch.sort(exact - quota, descending=True, stable=True).indices
    quota[order[:short]] += 1
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(NUM_CLASSES):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[: int(quota[c])]])
    return torch.cat(chosen).sort().values


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 x 64 pixel values (0..16) and labels, read from scikit-learn's data file without importing
    scikit-learn (2 s per process); through scikit-learn where its files are laid out otherwise."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.data, bunch.target


def load_digits() -> DataSplits:
    """Digits as uint8 1x8x8 tensors: DataSplits(train (1437), val=None, test (360))."""
    pixels, target = _digits_arrays()
    images = torch.from_numpy(pixels).reshape(-1, 1, 8, 8).mul(255.0 / 16.0).round().to(torch.uint8)
    labels = torch.from_numpy(target).long()
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    test_mask[_stratified_test_index(labels, TEST_SIZE, SPLIT_SEED)] = True
    train_x, train_y = images[~test_mask], labels[~test_mask]
    scaled = train_x.double() / 255.0
    mean = (round(scaled.mean().item(), 4),)
    std = (round(scaled.std().item(), 4),)
    train = ImageDataset(train_x, train_y, NUM_CLASSES, mean, std, "digits/train")
    test = ImageDataset(images[test_mask], labels[test_mask], NUM_CLASSES, mean, std, "digits/test")
    return DataSplits(train, None, test)


register("digits")(lambda cfg: load_digits())
