"""Build models by name: `build("resnet8x4", num_classes=100, in_channels=3)`; `hf:`, `timm:`, `torchvision:` and
`module:` names build outside models (`distillab.models.outside`)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable

from torch import nn

from distillab.errors import ConfigError, UnknownNameError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model factory `f(num_classes=..., in_channels=..., **kw)` under `name`."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        return factory

    return add


def available() -> list[str]:
    """Names of every registered model, sorted."""
    _load_zoo()
    return sorted(_MODELS)


def build(name: str, num_classes: int = 100, in_channels: int = 3, *,
          input_size: tuple[int, int, int] | None = None, **kwargs) -> nn.Module:
    """Instantiate the zoo model `name` (or an outside model, built and probed for `input_size`, default
    in_channels x 32 x 32); unknown names get the closest valid suggestion."""
    from distillab.models import outside

    if outside.is_outside(name):
        return outside.build(name, num_classes, in_channels, input_size, **kwargs)
    _load_zoo()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown model {name!r}{hint} (see `distillab models`, or name an outside model "
                               f"as {', '.join(p + ':...' for p in outside.PREFIXES)})")
    try:
        return _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        if kwargs and "argument" in str(exc):
            raise ConfigError(f"model {name!r} does not take the kwargs {sorted(kwargs)}: {exc}") from None
        raise


def _load_zoo() -> None:
    """Import every module of this package, so that their `@register` decorators run (a new model family is
    one new file, as a method is)."""
    import distillab.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"distillab.models.{info.name}")
