"""Datasets by name: every module of this package that calls `register` adds one, like the method registry.

A dataset is a function from the run's `DataConfig` to the *official* train and test sets (`DataSplits`
without a validation split); `load_splits` then holds out the validation split and takes the subsets, the same
way for every dataset.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from distillab.errors import UnknownNameError

if TYPE_CHECKING:
    from distillab.config import DataConfig
    from distillab.data.base import DataSplits

Loader = Callable[["DataConfig"], "DataSplits"]
_DATASETS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register `f(cfg: DataConfig) -> DataSplits` (the official train and test sets) under `name`."""

    def add(loader: Loader) -> Loader:
        if name in _DATASETS and _DATASETS[name] is not loader:
            raise ValueError(f"dataset {name!r} is registered twice")
        _DATASETS[name] = loader
        return loader

    return add


def _load_builtin_datasets() -> None:
    import distillab.data as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"distillab.data.{info.name}")


def available() -> list[str]:
    """Names of every registered dataset, sorted."""
    _load_builtin_datasets()
    return sorted(_DATASETS)


def get(name: str) -> Loader:
    """The loader registered as `name`; an unknown name gets the closest valid suggestion."""
    names = available()
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(names)}"
        raise UnknownNameError(f"unknown dataset {name!r}; {hint}")
    return _DATASETS[name]
