"""The frozen teacher's outputs for every training image, computed once and looked up by dataset position.

Without augmentation a training image is the same tensor every epoch, so a frozen teacher gives it the same
logits and features every epoch: a method that reads the teacher only through `Method.teacher_forward` can be
answered from a table instead of a forward pass. The table is made by the same loader pipeline (normalisation,
memory format) and autocast as the training step, so a lookup returns what the forward pass would (bit for bit
on the CPU, where a sample's output does not depend on the rest of its batch; tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn

from distillab.data.loader import DeviceLoader
from distillab.features import FeatureTap

LOGITS = "logits"


class TeacherCache:
    """Logits and tapped teacher features of every training image, rows in dataset order."""

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        self.outputs = outputs
        self.channels_last = {k: v.dim() == 4 and not v.is_contiguous() and
                              v.is_contiguous(memory_format=torch.channels_last) for k, v in outputs.items()}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.outputs.values())

    def __len__(self) -> int:
        return len(self.outputs[LOGITS])

    def rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        out = self.outputs[name][rows]
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last[name] else out

    def answer(self, rows: torch.Tensor, taps: Iterable[FeatureTap]) -> torch.Tensor:
        """The teacher's logits for the images at dataset positions `rows`, its taps filled as a forward would."""
        for tap in taps:
            tap.fill({name: self.rows(name, rows) for name in tap.names})
        return self.rows(LOGITS, rows)


def build_teacher_cache(teacher: nn.Module, taps: list[FeatureTap], loader: DeviceLoader,
                        autocast: Callable[[], AbstractContextManager], max_bytes: int) -> TeacherCache | None:
    """Run `teacher` once over `loader` (dataset order, no augmentation); None when the table would exceed
    `max_bytes` (judged from the first batch, before the rest is computed)."""
    if loader.shuffle or loader.augmenting or loader.strong_view:
        raise ValueError("the teacher cache needs a loader in dataset order without augmentation")
    chunks: dict[str, list[torch.Tensor]] = {}
    names = [name for tap in taps for name in tap.names]
    if len(set(names)) < len(names):
        raise ValueError(f"two taps on the teacher share a name: {names}")
    seen = 0
    with torch.no_grad(), autocast():
        for images, *_ in loader:
            logits = teacher(images)
            batch = {LOGITS: logits, **{n: v for tap in taps for n, v in zip(tap.names, tap.take(), strict=True)}}
            if not seen and sum(v[0].numel() * v.element_size() for v in batch.values()) * loader.dataset_size \
                    > max_bytes:
                return None
            for name, value in batch.items():
                chunks.setdefault(name, []).append(value)
            seen += len(images)
    return TeacherCache({name: torch.cat(values) for name, values in chunks.items()})


class CachedTeacher(nn.Module):
    """Stands in for the frozen teacher while a fit runs from a TeacherCache: answers the images at the dataset
    positions `rows` (set by the engine before each step) and fills the method's teacher taps as a forward would."""

    def __init__(self, cache: TeacherCache, taps: list[FeatureTap]) -> None:
        super().__init__()
        self.cache, self.taps = cache, taps
        self.rows: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.rows is None or len(self.rows) != len(images):
            raise RuntimeError("the cached teacher was called without the batch's dataset positions")
        return self.cache.answer(self.rows, self.taps)
