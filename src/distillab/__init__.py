"""distillab: knowledge distillation for vision models.

    import distillab as dl
    teacher = dl.models.build("resnet32x4", num_classes=100)
    student = dl.models.build("resnet8x4", num_classes=100)
    method = dl.methods.build("kd", student=student, teacher=teacher)
    summary = dl.Trainer(method, dl.data.cifar100(root), dl.TrainConfig(epochs=240)).fit()
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "models": "distillab.models",
    "methods": "distillab.methods",
    "data": "distillab.data",
    "Trainer": "distillab.engine.trainer:Trainer",
    "TrainConfig": "distillab.config:TrainConfig",
    "RunConfig": "distillab.config:RunConfig",
    "FeatureTap": "distillab.features:FeatureTap",
    "load_config": "distillab.config_files:load_config",
    "load_weights": "distillab.engine.checkpoint:load_weights",
    "train_run": "distillab.run:train_run",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import submodules on first use, so `import distillab` stays light."""
    if name not in _LAZY:
        raise AttributeError(f"module 'distillab' has no attribute {name!r}")
    module, _, attr = _LAZY[name].partition(":")
    value = importlib.import_module(module)
    return getattr(value, attr) if attr else value
