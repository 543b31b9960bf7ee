"""Accuracy and loss of a classifier on a whole dataset."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from distillab.data import DeviceLoader, ImageDataset


def eval_loader(dataset: ImageDataset, device: torch.device | str = "cpu", batch_size: int = 256,
                channels_last: bool = False) -> DeviceLoader:
    """Dataset order, no augmentation, every image once."""
    return DeviceLoader(dataset, batch_size, device=device, shuffle=False, augment=None,
                        channels_last=channels_last)


def evaluate(model: nn.Module, loader: DeviceLoader, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` over an evaluation loader, in eval mode."""
    sums = evaluate_sums(model, loader, autocast_dtype).tolist()
    return {"acc": 100.0 * sums[0] / sums[2], "loss": sums[1] / sums[2]}


@torch.no_grad()
def evaluate_sums(model: nn.Module, loader: DeviceLoader, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[correct, summed cross-entropy, images] on the loader's device (to all-reduce across ranks)."""
    device = torch.device(loader.device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    try:
        for images, labels in loader:
            with amp:
                logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
    finally:
        model.train(was_training)
    return torch.stack([correct.double(), loss_sum.double(),
                        torch.tensor(float(loader.num_samples), dtype=torch.float64, device=device)])


@torch.no_grad()
def probe_sums(method: nn.Module, loader: DeviceLoader, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[sum of each of `method.probes` over the loader's images (`Method.probe`), images] on the loader's device,
    in eval mode (to all-reduce across ranks)."""
    device = torch.device(loader.device)
    was_training = method.training
    method.eval()
    sums = torch.zeros(len(method.probes), device=device, dtype=torch.float64)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        for images, labels in loader:
            with amp:
                values = method.probe(images, labels)
            sums += torch.stack([values[name].double().sum() for name in method.probes])
    finally:
        method.train(was_training)
    return torch.cat([sums, torch.tensor([float(loader.num_samples)], dtype=torch.float64, device=device)])
