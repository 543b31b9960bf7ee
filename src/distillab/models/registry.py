"""Build models by name: `build("resnet8x4", num_classes=100, in_channels=3)`; `hf:`, `timm:`, `torchvision:` and
`module:` names build outside models (`distillab.models.outside`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from distillab.errors import ConfigError
from distillab.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "distillab.models", Path(__file__).parent,
                                                   "see `distillab models`, or name an outside model as "
                                                   "hf:..., timm:..., torchvision:... or module:...")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model factory `f(num_classes=..., in_channels=..., **kw)` under `name`."""
    return MODELS.register(name)


def available() -> list[str]:
    """Names of every registered model, sorted."""
    return list(MODELS.available())


def build(name: str, num_classes: int = 100, in_channels: int = 3, *,
          input_size: tuple[int, int, int] | None = None, exact_weights: bool = False, **kwargs) -> nn.Module:
    """Instantiate the zoo model `name` (or an outside model, built and probed for `input_size`, default
    in_channels x 32 x 32); unknown names get the closest valid suggestion. `exact_weights` (a teacher's): weights
    an outside model loads as it is built (an `hf:` directory's) must fit it exactly, or it is an error."""
    from distillab.models import outside

    if outside.is_outside(name):
        return outside.build(name, num_classes, in_channels, input_size, exact_weights, **kwargs)
    factory = MODELS.get(name)
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        if kwargs and "argument" in str(exc):
            raise ConfigError(f"model {name!r} does not take the kwargs {sorted(kwargs)}: {exc}") from None
        raise
