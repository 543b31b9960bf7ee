"""What a method may ask of the engine beyond the core contract: opt-in mixins the engine checks by type.

    class CRD(TrainSetIndices, Method): ...      each batch's dataset positions, forward's third argument
    class MLKD(StrongView, Method): ...          a strongly augmented view of each batch, forward's last argument
    class DFASearch(BilevelSearch, Method): ...  one batch from each of disjoint parts of the training set per
                                                 step, and a schedule that fixes the number of epochs
    class DFA(MultiStage, Method): ...           earlier stages (a search) trained by the same engine first
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distillab.errors import MissingInputError


def missing_input(method: str, what: str, call: str, source: str) -> MissingInputError:
    """The error of a method called, outside distillab's Trainer, without an input it needs."""
    return MissingInputError(f"method {method!r} needs {what}: call it as {call}; {source} (distillab's Trainer "
                             "does this by itself)")


class TrainSetIndices:
    """The method needs each image's position in the training set (e.g. CRD's memory bank): before training the
    engine calls `bind_train_set(train_labels)` once, and `forward(images, labels, indices)` gets the batch's
    positions."""

    def bind_train_set(self, train_labels: torch.Tensor) -> None:
        raise NotImplementedError


class StrongView:
    """Each batch also brings a strongly augmented view of the same images (RandAugment), as `forward`'s last
    argument. An instance whose options do not use it sets `strong_view = False`."""

    strong_view: bool = True


class BilevelSearch:
    """A search over disjoint parts of the training set: each step gets one batch of every part of
    `train_parts(n_train)` (index tensors), `forward(images, labels, images_2, labels_2, ...)`; its own schedule
    fixes the number of epochs (`fixed_epochs`)."""

    def train_parts(self, n_train: int) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def fixed_epochs(self) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class Stage:
    """One earlier stage of a multi-stage method, trained by the same engine into `<run>/stages/<name>/`.

    `method` and `options` replace the run's method; `train` holds train-config keys laid over the run's (the
    stage's own recipe); `link(options, stage_dir)` returns the final method's options, given the finished
    stage's directory (e.g. pointing them at a file the stage wrote).
    """

    name: str
    method: str
    options: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    link: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None


class MultiStage:
    """A method that runs earlier stages before its own training (e.g. a search), each a run of its own."""

    @classmethod
    def stages(cls, options: Any) -> list[Stage]:
        raise NotImplementedError


def stages(method_cls: type, options: Any) -> list[Stage]:
    """The earlier stages of a method class at `options`, in order (none for most)."""
    return method_cls.stages(options) if issubclass(method_cls, MultiStage) else []


def needs_indices(method: object) -> bool:
    return isinstance(method, TrainSetIndices)


def wants_strong_view(method: object) -> bool:
    return isinstance(method, StrongView) and method.strong_view


def train_parts(method: object, n_train: int) -> list[torch.Tensor] | None:
    """The parts a step draws one batch from each; None: the whole training set, one batch."""
    return method.train_parts(n_train) if isinstance(method, BilevelSearch) else None


def fixed_epochs(method: object) -> int | None:
    return method.fixed_epochs if isinstance(method, BilevelSearch) else None
