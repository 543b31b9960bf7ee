"""Datasets by name: every module of this package that calls `register` adds one, like the method registry.

A dataset is a function from the run's `DataConfig` to the *official* train and test sets (`DataSplits`
without a validation split); `load_splits` then holds out the validation split and takes the subsets, the same
way for every dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from distillab.registry import Registry

if TYPE_CHECKING:
    from distillab.config import DataConfig
    from distillab.data.base import DataSplits

Loader = Callable[["DataConfig"], "DataSplits"]
DATASETS: Registry[Loader] = Registry("dataset", "distillab.data", Path(__file__).parent)


def register(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register `f(cfg: DataConfig) -> DataSplits` (the official train and test sets) under `name`."""
    return DATASETS.register(name)


def available() -> list[str]:
    """Names of every registered dataset, sorted."""
    return list(DATASETS.available())


def get(name: str) -> Loader:
    """The loader registered as `name`; an unknown name gets the closest valid suggestion."""
    return DATASETS.get(name)
