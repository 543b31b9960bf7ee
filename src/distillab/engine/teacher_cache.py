"""The frozen teacher's outputs for every training image (in each of its fixed views), computed once and looked up
by row.

A frozen teacher gives an image the same logits and features whenever it sees the same tensor: without
augmentation every epoch shows the same image, and with fixed views (`train.teacher_views: K`, see
data/loader.py) every epoch shows one of K tensors per image. A method that reads the teacher only through
`Method.teacher_forward` can then be answered from a table (row `view * N + image`) instead of a forward pass. The
table is made by the same pipeline (crop and flip, normalisation, memory format) and autocast as the training
step, so a lookup returns what the forward pass would (bit for bit on the CPU, where a sample's output does not
depend on the rest of its batch; tested), unless a half-precision store is asked for (`train.teacher_cache_dtype`).

Each view, once computed, is saved in the run directory (`teacher_views/view_<k>.safetensors`, with a fingerprint
of what made it), so that an interrupted build resumes without redoing finished views.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from distillab.engine.checkpoint import atomic_write
from distillab.errors import DistillabError
from distillab.features import FeatureTap, feature_shapes

LOGITS = "logits"
VIEWS_DIR = "teacher_views"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherCache:
    """Logits and tapped teacher features, row `view * images_per_view + image`."""

    def __init__(self, outputs: dict[str, torch.Tensor], images_per_view: int,
                 answer_dtypes: dict[str, torch.dtype] | None = None) -> None:
        self.outputs, self.images_per_view = outputs, images_per_view
        self.answer_dtypes = answer_dtypes or {k: v.dtype for k, v in outputs.items()}
        self.channels_last = {k: v.dim() == 4 and not v.is_contiguous() and
                              v.is_contiguous(memory_format=torch.channels_last) for k, v in outputs.items()}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.outputs.values())

    def __len__(self) -> int:
        return len(self.outputs[LOGITS])

    def rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        out = self.outputs[name][rows].to(self.answer_dtypes[name])
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last[name] else out

    def answer(self, rows: torch.Tensor, taps: Iterable[FeatureTap]) -> torch.Tensor:
        """The teacher's logits for `rows`, its taps filled as a forward would."""
        for tap in taps:
            tap.fill({name: self.rows(name, rows) for name in tap.names})
        return self.rows(LOGITS, rows)


class CachedTeacher(nn.Module):
    """Stands in for the frozen teacher while a fit runs from a TeacherCache: answers the rows set by the engine
    before each step (`rows`) and fills the method's teacher taps as a forward would."""

    def __init__(self, cache: TeacherCache, taps: list[FeatureTap]) -> None:
        super().__init__()
        self.cache, self.taps = cache, taps
        self.rows: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.rows is None or len(self.rows) != len(images):
            raise RuntimeError("the cached teacher was called without the batch's rows")
        return self.cache.answer(self.rows, self.taps)


def output_bytes(teacher: nn.Module, taps: list[FeatureTap], input_shape: tuple[int, ...],
                 dtype: torch.dtype | None) -> dict[str, int]:
    """Bytes per image of the logits and of each tapped feature (a dry run of one input; `dtype` the store's,
    float32 where None)."""
    names = [name for tap in taps for name in tap.names]
    if len(set(names)) < len(names):
        raise ValueError(f"two taps on the teacher share a name: {names}")
    shapes = feature_shapes(teacher, ["", *names], input_shape)
    size = (dtype or torch.float32).itemsize
    return {LOGITS: _numel(shapes[""]) * size, **{n: _numel(shapes[n]) * size for n in names}}


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def check_cache_size(per_image: dict[str, int], images: int, views: int, limit_gib: float) -> int:
    """The cache's bytes; over `limit_gib`, a one-line error naming the size, the limit and what to lower."""
    total = sum(per_image.values()) * images * views
    if total > limit_gib * 2**30:
        parts = ", ".join(f"{k} {v:,} B" for k, v in per_image.items())
        raise DistillabError(f"the teacher cache would take {total / 2**20:,.1f} MiB ({views} views x {images:,} "
                             f"images x ({parts})), over train.teacher_cache_gib={limit_gib:g}: lower "
                             "train.teacher_views or data.train_subset, tap fewer teacher features, store "
                             "train.teacher_cache_dtype=float16, or raise the limit")
    return total


def fingerprint(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def build_teacher_cache(teacher: nn.Module, taps: list[FeatureTap],
                        view_batches: Callable[[int], Iterator[torch.Tensor]], views: int, images: int,
                        autocast: Callable[[], AbstractContextManager], *,
                        dtype: torch.dtype | None = None, store: Path | None = None, facts: str = "",
                        advance: Callable[[int], None] | None = None) -> TeacherCache:
    """Run `teacher` over `view_batches(k)` (every image in order, in view k) for each of `views` views. With a
    `store`, finished views are saved there and read back (when their fingerprint is `facts`) instead of being
    computed again. `advance(n)` is called as n images are done."""
    outputs: dict[str, torch.Tensor] = {}
    answer_dtypes: dict[str, torch.dtype] = {}
    for view in range(views):
        done = _read_view(store, view, facts) if store is not None else None
        if done is None:
            done = _compute_view(teacher, taps, view_batches(view), autocast, advance)
            answer_dtypes.update({k: v.dtype for k, v in done.items()})
            done = {k: v.to(dtype) if dtype is not None else v for k, v in done.items()}
            if store is not None:
                _write_view(store, view, facts, done, answer_dtypes)
        else:
            device = next(teacher.parameters()).device
            done, dtypes = {k: v.to(device) for k, v in done[0].items()}, done[1]
            answer_dtypes.update(dtypes)
            if advance is not None:
                advance(images)
        for name, value in done.items():
            if name not in outputs:  # allocated once, in the layout the teacher produced
                outputs[name] = torch.empty((views * images, *value.shape[1:]), dtype=value.dtype,
                                            device=value.device).to(memory_format=_layout(value))
            outputs[name][view * images:(view + 1) * images] = value
    return TeacherCache(outputs, images, answer_dtypes)


def _layout(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _compute_view(teacher: nn.Module, taps: list[FeatureTap], batches: Iterator[torch.Tensor],
                  autocast: Callable[[], AbstractContextManager], advance: Callable[[int], None] | None
                  ) -> dict[str, torch.Tensor]:
    chunks: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), autocast():
        for images in batches:
            logits = teacher(images)
            batch = {LOGITS: logits, **{n: v for tap in taps for n, v in zip(tap.names, tap.take(), strict=True)}}
            for name, value in batch.items():
                chunks.setdefault(name, []).append(value)
            if advance is not None:
                advance(len(images))
    return {name: torch.cat(values) for name, values in chunks.items()}


def _view_file(store: Path, view: int) -> Path:
    return store / f"view_{view:04d}.safetensors"


def _read_view(store: Path, view: int, facts: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]] | None:
    path = _view_file(store, view)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("facts") != facts:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        dtypes = {k: DTYPES[v] for k, v in json.loads(meta["answer_dtypes"]).items()}
    except Exception:  # a torn or foreign file: computed again
        return None
    layouts = json.loads(meta.get("channels_last", "[]"))
    return {k: v.contiguous(memory_format=torch.channels_last) if k in layouts else v
            for k, v in tensors.items()}, dtypes


def _write_view(store: Path, view: int, facts: str, outputs: dict[str, torch.Tensor],
                answer_dtypes: dict[str, torch.dtype]) -> None:
    store.mkdir(parents=True, exist_ok=True)
    names = {v: k for k, v in DTYPES.items()}
    meta = {"facts": facts, "answer_dtypes": json.dumps({k: names[v] for k, v in answer_dtypes.items()}),
            "channels_last": json.dumps([k for k, v in outputs.items() if _layout(v) == torch.channels_last])}
    cpu = {k: v.detach().contiguous().cpu() for k, v in outputs.items()}
    atomic_write(_view_file(store, view), lambda tmp: save_file(cpu, str(tmp), metadata=meta))
