"""The model zoo: `build(name, num_classes=..., in_channels=...)` gives a StagedNet."""

from distillab.models.registry import available, build, register
from distillab.models.staged import ClassifierHead, StagedNet

__all__ = ["ClassifierHead", "StagedNet", "available", "build", "register"]
