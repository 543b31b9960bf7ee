"""Accuracy and loss of a classifier on a whole dataset."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from distillab.data import DeviceLoader, ImageDataset


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, *, device: torch.device | str = "cpu",
             batch_size: int = 256, autocast_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `dataset`, in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DeviceLoader(dataset, batch_size, device=device, shuffle=False, augment=None,
                          channels_last=channels_last)
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
    n = len(dataset)
    return {"acc": 100.0 * correct.item() / n, "loss": loss_sum.item() / n}
