"""The batch the training loop hands a method: named parts instead of positions in a tuple."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """One loader's batch. `indices`: the images' dataset positions (when the method or the teacher cache needs
    them); `strong`: a strongly augmented view of the same images (for methods that ask for one)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None
    strong: torch.Tensor | None = None

    @classmethod
    def of(cls, items: tuple[torch.Tensor, ...], with_indices: bool, strong_view: bool) -> Batch:
        """The batch of a `DeviceLoader`'s tuple `(images, labels[, indices][, strong])`."""
        images, labels, *rest = items
        return cls(images, labels, rest[0] if with_indices else None, rest[-1] if strong_view else None)

    def method_args(self, indices: bool) -> tuple[torch.Tensor, ...]:
        """`Method.forward`'s positional arguments: images, labels[, indices][, strong]."""
        return (self.images, self.labels, *([self.indices] if indices else []),
                *([self.strong] if self.strong is not None else []))

    def __len__(self) -> int:
        return len(self.labels)
