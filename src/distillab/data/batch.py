"""The batch a `DeviceLoader` yields: named parts instead of positions in a tuple."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """`indices`: the images' dataset positions (when asked for: a method's or the teacher cache's); `strong`: a
    strongly augmented view of the same images (for methods that ask for one); `views`: which of its fixed views
    each image is shown in (with `train.teacher_views`). Unpacks like the tuple `(images, labels[, indices][,
    strong])` and indexes like it."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None
    strong: torch.Tensor | None = None
    views: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.images, self.labels, *[t for t in (self.indices, self.strong) if t is not None]))

    def __getitem__(self, i: int | slice) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return tuple(self)[i]

    def method_args(self, indices: bool) -> tuple[torch.Tensor, ...]:
        """`Method.forward`'s positional arguments: images, labels[, indices][, strong]."""
        return (self.images, self.labels, *([self.indices] if indices else []),
                *([self.strong] if self.strong is not None else []))

    def __len__(self) -> int:  # as the tuple's
        return 2 + (self.indices is not None) + (self.strong is not None)

    @property
    def size(self) -> int:
        """The number of images."""
        return len(self.labels)
