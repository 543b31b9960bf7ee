"""Default tap names on zoo models (StagedNet) for the feature-based baselines.

Other models have no such names: the method then asks for its layer options by name.
"""

from __future__ import annotations

from torch import nn

from distillab.errors import ConfigError
from distillab.features import feature_shapes


def _require_zoo(model: nn.Module, option: str) -> None:
    if not getattr(model, "feature_names", None):
        raise ConfigError(f"{type(model).__name__} is not a zoo model: set method.options.{option}")


def stage_names(model: nn.Module, option: str) -> list[str]:
    """Every stage output, shallow to deep (RepDistiller's feats[1:-1], mdistiller's feats[1:])."""
    _require_zoo(model, option)
    return list(model.feature_names)


def pooled_name(model: nn.Module, option: str) -> str:
    """The globally pooled penultimate vector (B x d)."""
    _require_zoo(model, option)
    return model.pooled_name


def preact_stage_names(model: nn.Module, input_shape: tuple[int, int, int], option: str) -> list[str]:
    """Stage outputs before their last ReLU: `<last block>.relu:input` where that block ends in a ReLU of the
    full stage width; otherwise (pre-activation WRN, linear-bottleneck MobileNetV2, ShuffleV2's half-width
    ReLU) the stage output itself, which then is the stage's pre-activation or the closest tensor to it."""
    names = stage_names(model, option)
    modules = dict(model.named_modules())
    candidates = []
    for name in names:
        last_block = f"{name}.{len(modules[name]) - 1}" if isinstance(modules[name], nn.Sequential) else name
        relu = modules.get(f"{last_block}.relu")
        candidates.append(f"{last_block}.relu:input" if isinstance(relu, nn.ReLU) else name)
    shapes = feature_shapes(model, [*names, *candidates], input_shape)
    return [c if shapes[c] == shapes[n] else n for n, c in zip(names, candidates, strict=True)]
