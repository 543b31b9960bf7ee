"""Datasets as whole uint8 tensors, and the train/val/test splits a run uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageDataset:
    """A whole image classification set held in memory.

    `images` is uint8 N x C x H x W, `labels` int64 N; `mean`/`std` are the per-channel
    normalisation constants (on the 0..1 scale) used by the loader.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 N x C x H x W, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                             f"{tuple(self.labels.shape)}")
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.images.shape[1]})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor, name: str | None = None) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.num_classes, self.mean, self.std,
                            name or self.name)


@dataclass
class DataSplits:
    """What a run trains and evaluates on. `val` is None when no validation split is held out. `random_labels`:
    the labels are drawn at random (synthetic data), so no model can beat chance on them."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    random_labels: bool = False

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape
