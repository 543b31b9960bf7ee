"""Datasets as whole uint8 tensors, the splits a run uses, and the on-device batch loader."""

from __future__ import annotations

from pathlib import Path

from distillab.data.base import DataSplits, ImageDataset
from distillab.data.cifar import load_cifar
from distillab.data.digits import load_digits
from distillab.data.fashion_mnist import load_fashion_mnist
from distillab.data.loader import DeviceLoader
from distillab.data.splits import load_splits

__all__ = [
    "DataSplits",
    "DeviceLoader",
    "ImageDataset",
    "cifar10",
    "cifar100",
    "load_cifar",
    "load_digits",
    "load_fashion_mnist",
    "load_splits",
]


def cifar10(root: str | Path, download: bool = True) -> DataSplits:
    """CIFAR-10 train (50000) and test (10000), no validation split."""
    return load_cifar(root, "cifar10", download)


def cifar100(root: str | Path, download: bool = True) -> DataSplits:
    """CIFAR-100 train (50000) and test (10000), no validation split."""
    return load_cifar(root, "cifar100", download)

