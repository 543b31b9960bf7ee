"""DeviceLoader: batches of a whole in-memory dataset, shuffled, sharded and augmented on the device.

Reproducibility: every random choice is a pure function of (seed, epoch, position in the epoch), so an
epoch yields the same batches whatever ran before it and however many ranks share it, on CPU and GPU
alike (the random numbers are drawn on the CPU and moved to the device). Call `set_epoch(epoch)` before
each epoch, like a DistributedSampler; `set_epoch(epoch, start_batch=k)` resumes an interrupted epoch at
batch k.

Fixed views (`views=K`, `train.teacher_views`): instead of a fresh crop and flip each epoch, every image gets K
crops and flips drawn once from the seed, and each epoch shows it in one of them (drawn per epoch); the teacher's
outputs for all K views can then be computed once (engine/teacher_cache.py).

Sharding (world_size > 1): rank r takes every world_size-th entry of the epoch's permutation, starting
at r. So that all ranks run the same number of steps, the permutation is first padded by repeating its
beginning up to a multiple of world_size (drop_last=False) or its tail is cut off (drop_last=True).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from distillab.config import AugmentConfig
from distillab.data.base import ImageDataset
from distillab.data.batch import Batch
from distillab.data.randaugment import draw_strong, rand_augment
from distillab.errors import ConfigError


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from the parts (stable across processes and Python versions)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def crop_flip(images: torch.Tensor, padding: int, offsets: torch.Tensor | None,
              flips: torch.Tensor | None) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of a whole batch, in one gather.

    `offsets` is B x 2 (row, column) in [0, 2*padding]: output pixel (r, k) of image i is pixel
    (r + offsets[i, 0] - padding, k + offsets[i, 1] - padding) of the input, or 0 outside it. `flips`
    (B bools) mirrors the cropped image left-right. Works on any dtype; shape is unchanged.
    """
    b, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if offsets is not None and padding > 0:
        images = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        rows = rows + offsets[:, :1]
        cols = cols + offsets[:, 1:]
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch_index = torch.arange(b, device=dev)[:, None, None, None]
    channel_index = torch.arange(c, device=dev)[None, :, None, None]
    return images[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Iterates `Batch`es (unpacking as `(x, y)`): x float32 N x C x H x W normalised ((x/255 - mean)/std), y int64.

    The uint8 dataset is copied to `device` once. `shuffle=False, augment=None` gives an evaluation
    loader (dataset order). With `drop_last`, the last partial batch is dropped. No worker processes.
    With `with_indices`, batches carry `indices` (int64, on the device), the images' dataset positions.
    With `strong_view`, each batch brings a second, strongly augmented view of the same images (its own crop
    and flip, RandAugment and Cutout: `distillab.data.randaugment`), made on the device. With `views=K`, the crop
    and flip of each image are one of its K fixed views (see the module's docstring), named in `Batch.views`.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, device: str | torch.device = "cpu",
                 shuffle: bool = True, augment: AugmentConfig | None = None, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 with_indices: bool = False, strong_view: bool = False, views: int | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        n = len(dataset)
        if n == 0:
            raise ValueError(f"{dataset.name or 'dataset'} is empty")
        self.dataset_size = n
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.with_indices = with_indices
        self.strong_view = strong_view
        self.padding = augment.crop_padding if augment is not None else 0
        self.flip = augment.flip if augment is not None else False
        side = min(dataset.images.shape[-2:])
        if self.padding > side:
            raise ConfigError(f"data.augment.crop_padding={self.padding} exceeds the images' side ({side} pixels): "
                              "the crop would see mostly padding")
        self.shard_size = n // world_size if drop_last else math.ceil(n / world_size)
        if self.shard_size == 0:
            raise ValueError(f"{n} images cannot be shared by {world_size} ranks with drop_last")
        if drop_last and batch_size > self.shard_size:
            per = f" per rank ({world_size} ranks)" if world_size > 1 else ""
            raise ValueError(f"batch_size={batch_size} exceeds the {self.shard_size} images of "
                             f"{dataset.name or 'the dataset'}{per}; with drop_last no batch would remain")
        self.name = dataset.name
        self.num_classes = dataset.num_classes
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std)  # (x/255 - mean)/std == x * scale - shift
        self._shift = mean / std
        self._fill = (mean * 255.0).flatten()  # Cutout's colour: the dataset's mean
        self.epoch = 0
        self._start_batch = 0
        self.views = views
        self._view_draws = self._draw_views(views) if views is not None else None

    @property
    def augmenting(self) -> bool:
        return self.padding > 0 or self.flip

    def _draw_views(self, views: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Crop offsets (K x N x 2) and flips (K x N) of every image's K fixed views, on the CPU."""
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        gen = torch.Generator().manual_seed(derive_seed("views", self.seed))
        n = self.dataset_size
        offsets = torch.randint(0, 2 * self.padding + 1, (views, n, 2), generator=gen) if self.padding else None
        flips = torch.rand(views, n, generator=gen) < 0.5 if self.flip else None
        return offsets, flips

    def view_batches(self, view: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The whole dataset in order, every image in its fixed view `view`, as normalised batches (what the
        teacher cache is built from)."""
        offsets, flips = self._view_draws
        for start in range(0, self.dataset_size, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.dataset_size))
            yield self._prepare(self.images[idx.to(self.device)],
                                None if offsets is None else offsets[view, idx].to(self.device),
                                None if flips is None else flips[view, idx].to(self.device))

    @property
    def num_samples(self) -> int:
        """Images this rank yields per epoch."""
        if self.drop_last:
            return len(self) * self.batch_size
        return self.shard_size

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's shuffle and augmentation; the next iteration starts at `start_batch`."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} outside 0..{len(self)}")
        self.epoch = epoch
        self._start_batch = start_batch

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """Dataset indices this rank visits in `epoch` (default: the current one), in order, on the CPU."""
        return self._epoch_order(self.epoch if epoch is None else epoch)[0]

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's dataset indices and their positions in the epoch's global (padded) order."""
        n = self.dataset_size
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed("perm", self.seed, epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self.shard_size * self.world_size
        if total > n:  # pad by wrapping around to the beginning
            order = order.repeat(math.ceil(total / n))
        positions = torch.arange(total)[self.rank :: self.world_size]
        return order[positions], positions

    def _epoch_augment(self, epoch: int, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Crop offsets and flips for the given global positions of `epoch`.

        Drawn for the whole epoch at once and indexed by position, so the image at a given position is
        augmented alike whatever the number of ranks (a data-parallel run sees the same batches as one
        process with the same global batch).
        """
        total = self.shard_size * self.world_size
        if self._view_draws is not None:
            return self._epoch_views(epoch, positions)
        gen = torch.Generator().manual_seed(derive_seed("augment", self.seed, epoch))
        offsets = flips = None
        if self.padding > 0:
            offsets = torch.randint(0, 2 * self.padding + 1, (total, 2), generator=gen)[positions].to(self.device)
        if self.flip:
            flips = (torch.rand(total, generator=gen) < 0.5)[positions].to(self.device)
        return offsets, flips

    def epoch_views(self, epoch: int, positions: torch.Tensor) -> torch.Tensor:
        """Which fixed view each of the given global positions of `epoch` shows (CPU)."""
        total = self.shard_size * self.world_size
        gen = torch.Generator().manual_seed(derive_seed("view-pick", self.seed, epoch))
        return torch.randint(0, self.views, (total,), generator=gen)[positions]

    def _epoch_views(self, epoch: int, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        offsets, flips = self._view_draws
        picks, indices = self.epoch_views(epoch, positions), self._epoch_order(epoch)[0]
        return (None if offsets is None else offsets[picks, indices].to(self.device),
                None if flips is None else flips[picks, indices].to(self.device))

    def _prepare(self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
        """Crop and flip (where given), normalise, lay out."""
        if self.augmenting:
            x = crop_flip(x, self.padding, offsets, flips)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mul_(self._scale).sub_(self._shift)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _epoch_strong(self, epoch: int, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The strong view's crops, flips, ops and Cutouts for the given global positions of `epoch`."""
        total = self.shard_size * self.world_size
        gen = torch.Generator().manual_seed(derive_seed("strong", self.seed, epoch))
        draws = {"offsets": torch.randint(0, 2 * self.padding + 1, (total, 2), generator=gen) if self.padding
                 else None, "flips": torch.rand(total, generator=gen) < 0.5 if self.flip else None,
                 **draw_strong(total, gen)}
        return {k: v[positions].to(self.device) for k, v in draws.items() if v is not None}

    def __iter__(self) -> Iterator[Batch]:
        start, self._start_batch = self._start_batch, 0
        indices, positions = self._epoch_order(self.epoch)
        indices = indices.to(self.device)
        offsets, flips = self._epoch_augment(self.epoch, positions) if self.augmenting else (None, None)
        strong = self._epoch_strong(self.epoch, positions) if self.strong_view else {}
        picks = self.epoch_views(self.epoch, positions).to(self.device) if self.views is not None else None
        for b in range(start, len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = indices[batch]
            x = self._prepare(self.images[idx], None if offsets is None else offsets[batch],
                              None if flips is None else flips[batch])
            x_strong = None
            if self.strong_view:
                d = {k: v[batch] for k, v in strong.items()}
                x_strong = crop_flip(self.images[idx], self.padding, d.get("offsets"), d.get("flips"))
                x_strong = self._normalise(rand_augment(x_strong, d["ops"], d["magnitudes"], d["cutout"], self._fill))
            yield Batch(x, self.labels[idx], idx if self.with_indices else None, x_strong,
                        None if picks is None else picks[batch])
