"""The train/val/test splits a run uses, built from a DataConfig."""

from __future__ import annotations

import torch

from distillab.config import DataConfig, SyntheticConfig
from distillab.data import registry
from distillab.data.base import DataSplits, ImageDataset
from distillab.data.registry import register
from distillab.errors import ConfigError, UnknownNameError


def synthetic(cfg: SyntheticConfig, seed: int) -> DataSplits:
    """Seeded random uint8 images and labels (for speed measurements only: there is nothing to learn)."""
    g = torch.Generator().manual_seed(seed)
    c = cfg.image_shape[0]

    def make(n: int, name: str) -> ImageDataset:
        images = torch.randint(0, 256, (n, *cfg.image_shape), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
        return ImageDataset(images, labels, cfg.num_classes, (0.5,) * c, (0.29,) * c, name)

    return DataSplits(make(cfg.train_size, "synthetic/train"), None, make(cfg.test_size, "synthetic/test"),
                      random_labels=True)


register("synthetic")(lambda cfg: synthetic(cfg.synthetic, cfg.split_seed))


def load_dataset(cfg: DataConfig) -> DataSplits:
    """The full official train and test sets of `cfg.name` (no validation split), from the dataset registry."""
    try:
        loader = registry.get(cfg.name)
    except UnknownNameError as exc:
        raise ConfigError(f"data.name: {exc}") from None
    return loader(cfg)


def split_train(train: ImageDataset, val_size: int, train_subset: int | None,
                seed: int) -> tuple[ImageDataset, ImageDataset | None]:
    """Hold out `val_size` random training images, then keep a random `train_subset` of the rest.

    One permutation from a generator seeded with `seed` drives both: its first `val_size` entries
    are the validation split and the next `train_subset` the training subset, so the validation
    split does not depend on `train_subset`. Indices are kept in their original order.
    """
    n = len(train)
    if val_size >= n:
        raise ConfigError(f"data.val_size={val_size} must be smaller than the {n} training images of "
                          f"{train.name or 'the dataset'}")
    left = n - val_size
    if train_subset is not None and train_subset > left:
        raise ConfigError(f"data.train_subset={train_subset} exceeds the {left} training images left "
                          f"after holding out data.val_size={val_size}")
    if val_size == 0 and train_subset is None:
        return train, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    base = train.name.rsplit("/", 1)[0]
    val = None
    if val_size:
        val = train.subset(perm[:val_size].sort().values, f"{base}/val")
    keep = perm[val_size:] if train_subset is None else perm[val_size:val_size + train_subset]
    return train.subset(keep.sort().values, train.name), val


def load_splits(cfg: DataConfig) -> DataSplits:
    """Train/val/test of `cfg`: the official sets, a seeded validation split held out from train
    (`val_size`), a seeded random `train_subset` of the remaining train images, the first `test_subset`
    test images."""
    full = load_dataset(cfg)
    train, val = split_train(full.train, cfg.val_size, cfg.train_subset, cfg.split_seed)
    test = full.test
    if cfg.test_subset is not None:
        if cfg.test_subset > len(test):
            raise ConfigError(f"data.test_subset={cfg.test_subset} exceeds the {len(test)} test images of "
                              f"{cfg.name}")
        test = test.subset(torch.arange(cfg.test_subset), test.name)
    return DataSplits(train, val, test, random_labels=full.random_labels)
