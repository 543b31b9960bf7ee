"""The model zoo: `build(name, num_classes=..., in_channels=...)` gives a StagedNet; `load_weights(model, path)`
loads a run directory, a .safetensors file or a peer's .pth into it, strictly."""

from distillab.engine.checkpoint import load_weights
from distillab.models.registry import available, build, register
from distillab.models.staged import ClassifierHead, StagedNet

__all__ = ["ClassifierHead", "StagedNet", "available", "build", "load_weights", "register"]
