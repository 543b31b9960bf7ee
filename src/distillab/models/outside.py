"""Models from outside the zoo, adapted to its contract: a forward that returns logits, and feature roles.

`student.name` / `teacher.name` (and `models.build`) take, besides a zoo name:

    hf:<model_type>            a transformers `AutoModelForImageClassification` built from a config: `kwargs` are
                               the config's fields (`hf:vit` with `{hidden_size: 192, ...}`); no download
    hf:<directory>             a `save_pretrained` directory: its config.json, and its weights when it holds any
    timm:<name>                `timm.create_model(name, pretrained=False, **kwargs)`, roles from its `feature_info`
    torchvision:<name>         `torchvision.models.get_model(name, weights=None, **kwargs)`; roles for the ResNet layout
    module:<pkg.mod>:<factory> `factory(**kwargs)` from any importable module

The number of classes and input channels come from the data. A model whose forward returns a `ModelOutput`, a
dict or a tuple is wrapped so that it returns the logits; its modules then sit under `model.`. Hugging Face models
get their roles from `output_hidden_states`: token features (B x N x C) become maps (B x C x H x W) with the
class/register tokens dropped; the hidden states are grouped into stages by resolution (a plain ViT, one
resolution, into up to four groups of equal depth). These packages are optional: a missing one is named.

Weights an `hf:<directory>` holds load exactly into a teacher (`exact_weights`): a saved tensor whose shape does not
fit the data (a head for other classes, a stem for other channels), or a missing or unexpected one, is an error
naming them. A student's mismatched tensors are re-initialised, with a `ReinitialisedWeights` warning naming them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillab.errors import CheckpointError, ConfigError, DistillabError, DistillabWarning
from distillab.roles import FeatureInfo, StageInfo

PREFIXES = ("hf", "timm", "torchvision", "module")
PACKAGES = {"hf": "transformers", "timm": "timm", "torchvision": "torchvision"}  # the package each prefix needs
MAX_TOKEN_STAGES = 4
LISTED = 3  # tensors named in full by a weights report; more are counted


class ReinitialisedWeights(DistillabWarning):
    """Saved tensors of a student's `hf:` directory that did not fit the model were re-initialised."""


def is_outside(name: str) -> bool:
    """Whether `name` is a `prefix:...` spec of an outside model rather than a zoo name."""
    return name.partition(":")[0] in PREFIXES and ":" in name


def build(name: str, num_classes: int, in_channels: int, input_size: tuple[int, int, int] | None,
          exact_weights: bool = False, **kwargs: Any) -> nn.Module:
    """The outside model `name` (see the module docstring), returning logits, with `feature_info` where known.
    Whatever the model's own code raises, and a model without parameters or without `num_classes` logits, is a
    ConfigError naming it. `exact_weights`: weights loaded at build (an `hf:` directory's) must fit exactly."""
    prefix, _, target = name.partition(":")
    if not target:
        raise ConfigError(f"model {name!r}: nothing after {prefix + ':'!r}")
    size = input_size or (in_channels, 32, 32)
    return _guarded(name, size, num_classes,
                    lambda: _build(prefix, target, name, num_classes, in_channels, size, kwargs, exact_weights))


def build_hf_from_config(name: str, config: dict[str, Any], input_size: tuple[int, int, int]) -> nn.Module:
    """The `hf:` model `name` rebuilt from its transformers config (`config.to_dict()`, as `card_entries` records
    it), without the directory or kwargs it was first built from; its weights are the caller's to load."""
    if not isinstance(config, dict) or not isinstance(config.get("id2label"), dict):
        raise ConfigError(f"model {name!r}: its transformers config is not a config.json mapping with id2label")

    def rebuild() -> nn.Module:
        transformers = _optional("transformers", name)
        model_type = config.get("model_type")
        try:
            config_class = type(transformers.AutoConfig.for_model(str(model_type)))
        except ValueError:
            raise ConfigError(f"model {name!r}: transformers {transformers.__version__} has no model type "
                              f"{model_type!r}") from None
        with _quiet_transformers():
            model = transformers.AutoModelForImageClassification.from_config(config_class.from_dict(config))
        return HFClassifier(model, input_size)

    return _guarded(name, input_size, len(config["id2label"]), rebuild)


def card_entries(name: str, model: nn.Module) -> dict[str, Any]:
    """What an export card needs beyond `name` and kwargs to rebuild the outside model `model`: the version of the
    package that built it (`packages`) and, for `hf:`, its transformers config (`hf_config`), so that no directory
    is needed. Empty for a zoo name."""
    prefix = name.partition(":")[0]
    if not is_outside(name):
        return {}
    entries: dict[str, Any] = {}
    package = PACKAGES.get(prefix)
    if package is not None:
        version = getattr(importlib.import_module(package), "__version__", None)
        entries["packages"] = {package: str(version)}
    hf = next((m for m in model.modules() if isinstance(m, HFClassifier)), None)
    if prefix == "hf" and hf is not None:
        entries["hf_config"] = json.loads(hf.model.config.to_json_string(use_diff=False))
    return entries


def _guarded(name: str, size: tuple[int, int, int], num_classes: int, make: Callable[[], nn.Module]) -> nn.Module:
    """`make()`, checked to give `num_classes` logits; whatever code outside distillab raises is one line naming
    the model."""
    try:
        model = make()
        check_logits(model, num_classes, size, name)
    except DistillabError:
        raise
    except Exception as exc:  # code outside distillab: any failure is the model's
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"model {name!r} failed to build or to run on a {'x'.join(map(str, size))} input: "
                          f"{type(exc).__name__}: {_clip(first)}") from None
    return model


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_logits(model: nn.Module, num_classes: int, size: tuple[int, int, int], name: str) -> None:
    """A model to train has parameters, and maps a 1 x C x H x W input to 1 x num_classes logits."""
    param = next(model.parameters(), None)
    if param is None:
        raise ConfigError(f"model {name!r} ({type(model).__name__}) has no parameters to train")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(torch.zeros(1, *size, dtype=param.dtype)))
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, num_classes):
        raise ConfigError(f"model {name!r} gives one image an output of shape {tuple(out.shape)}, not (1, "
                          f"{num_classes}) logits")


def _build(prefix: str, target: str, name: str, num_classes: int, in_channels: int, size: tuple[int, int, int],
           kwargs: dict[str, Any], exact_weights: bool) -> nn.Module:
    if prefix == "hf":
        return _build_hf(target, num_classes, in_channels, size, kwargs, exact_weights)
    if prefix == "timm":
        timm = _optional("timm", name)
        model = timm.create_model(target, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
        return _with_roles(model, timm_roles(model, num_classes), size, wrap=True)  # keep timm's own feature_info
    if prefix == "torchvision":
        tv_models = _optional("torchvision.models", name)
        if in_channels != 3:
            raise ConfigError(f"model {name!r}: torchvision models take 3 input channels, the data has {in_channels}")
        model = tv_models.get_model(target, weights=None, num_classes=num_classes, **kwargs)
        return _with_roles(model, torchvision_roles(model), size)
    return _build_from_module(name, target, num_classes, in_channels, size, kwargs)


def _optional(package: str, name: str):
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(f"model {name!r} needs the {package.split('.')[0]} package, which cannot be imported "
                          f"here ({exc})") from None


# -- Hugging Face ------------------------------------------------------------------------------------------------
def _build_hf(target: str, num_classes: int, in_channels: int, size: tuple[int, int, int],
              kwargs: dict[str, Any], exact_weights: bool) -> nn.Module:
    name = f"hf:{target}"
    transformers = _optional("transformers", name)
    auto = transformers.AutoModelForImageClassification
    directory = Path(target)
    fields = {"num_labels": num_classes, "num_channels": in_channels, **kwargs}
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise ConfigError(f"model {name}: the directory holds no config.json")
        weights = any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(directory, **fields)
        _default_image_size(config, kwargs, size)
        model = (_load_hf_weights(auto, directory, config, name, exact_weights) if weights
                 else auto.from_config(config))
        adapted = HFClassifier(model, size)
        adapted.weights_source = directory if weights else None
        return adapted
    try:
        config = transformers.AutoConfig.for_model(target, **fields)
    except ValueError:
        raise ConfigError(f"model {name}: {target!r} is neither a directory nor a transformers model type (no "
                          f"directory at {directory.absolute()}; model types are such as vit, resnet, convnext)"
                          ) from None
    _default_image_size(config, kwargs, size)
    try:
        model = auto.from_config(config)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model {name}: transformers has no image classifier for it "
                          f"({_clip(str(exc).strip())})") from None
    return HFClassifier(model, size)


def _load_hf_weights(auto, directory: Path, config, name: str, exact: bool) -> nn.Module:
    """The model of `config` with the weights saved in `directory`. With `exact` (a teacher), any saved tensor
    that does not fit (or is missing, or is not the model's) is an error naming it; otherwise those of the wrong
    shape and the missing ones keep their fresh init, with a warning naming them."""
    with _quiet_transformers():
        model, info = auto.from_pretrained(directory, config=config, ignore_mismatched_sizes=True,
                                           output_loading_info=True)
    mismatched = sorted((str(k), tuple(saved), tuple(expected))
                        for k, saved, expected in info.get("mismatched_keys") or ())
    missing = sorted(map(str, info.get("missing_keys") or ()))
    unexpected = sorted(map(str, info.get("unexpected_keys") or ()))
    if not (mismatched or missing or unexpected):
        return model
    problems = []
    if mismatched:
        problems.append(_listed([f"{k!r} saved {_shape(a)}, expected {_shape(b)}" for k, a, b in mismatched]))
    if missing:
        problems.append(f"missing from the file: {_listed([repr(k) for k in missing])}")
    if unexpected:
        problems.append(f"not in the model: {_listed([repr(k) for k in unexpected])}")
    report = "; ".join(problems)
    if exact:
        raise CheckpointError(f"teacher {name}: its saved weights do not fit: {report}{_saved_for(directory, config)}"
                              ": a teacher is loaded exactly, so it must have been trained on this data's classes "
                              "and input channels (and with the architecture its config.json and kwargs give)")
    reinitialised = [k for k, _, _ in mismatched] + missing
    warnings.warn(f"student {name}: {len(reinitialised)} saved tensor(s) re-initialised, the rest loaded: "
                  f"{report}{_saved_for(directory, config)}", ReinitialisedWeights, stacklevel=2)
    return model


def _saved_for(directory: Path, config) -> str:
    """`(saved for 1000 classes, 3 channels; the data has 10, 1)` where config.json's differ from `config`'s."""
    try:
        saved = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    labels = len(saved["id2label"]) if isinstance(saved.get("id2label"), dict) else saved.get("num_labels")
    pairs = [(labels, config.num_labels, "classes"),
             (saved.get("num_channels"), getattr(config, "num_channels", None), "channels")]
    differ = [(a, b, what) for a, b, what in pairs if a is not None and b is not None and a != b]
    if not differ:
        return ""
    return (f" (saved for {' and '.join(f'{a} {what}' for a, _, what in differ)}, where the data has "
            f"{' and '.join(str(b) for _, b, _ in differ)})")


def _listed(items: list[str]) -> str:
    more = len(items) - LISTED
    return ", ".join(items[:LISTED]) + (f" and {more} more" if more > 0 else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own loading report and progress bars off: what matters is reported here, in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _default_image_size(config, kwargs: dict[str, Any], size: tuple[int, int, int]) -> None:
    """Models with a fixed input size (ViT's position table) are built for the data's, unless kwargs set one."""
    if hasattr(config, "image_size") and "image_size" not in kwargs:
        config.image_size = size[1]


class HFClassifier(nn.Module):
    """A transformers image classifier returning logits, with feature roles from its hidden states.

    Every hidden state (as a map) passes through `hidden.<j>` (an identity), the tap names of the roles: j = 0 is
    the embedding output, j >= 1 the blocks/stages. The pooled vector is the input of the classifier layer.
    """

    weights_source: Path | None = None  # a directory whose weights were loaded at build
    own_layout_hint = "a transformers save_pretrained directory loads as the model name hf:<directory>"

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.patch = _pair(getattr(config, "patch_size", None))
        self.input_size = tuple(input_size)
        with torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                out = model(pixel_values=torch.zeros(1, *input_size), output_hidden_states=True)
            finally:
                model.train(was_training)
            states = self._states(out)
            shapes = [tuple(h.shape[1:]) for h in self._maps(out, input_size[1:])]
        self.hidden = nn.ModuleList(nn.Identity() for _ in shapes)
        self._info = self._roles(shapes, config.num_labels, native_maps=states[-1].dim() == 4)

    @property
    def feature_info(self) -> FeatureInfo:
        return self._info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, output_hidden_states=True)
        for tap, h in zip(self.hidden, self._maps(out, x.shape[-2:]), strict=True):
            tap(h)
        return out.logits

    def _states(self, out) -> tuple[torch.Tensor, ...]:
        states = getattr(out, "reshaped_hidden_states", None) or out.hidden_states
        if not states:
            raise ConfigError(f"{type(self.model).__name__} returns no hidden states: no feature roles")
        return states

    def _maps(self, out, size) -> list[torch.Tensor]:
        """The hidden states as B x C x H x W maps."""
        return [h if h.dim() == 4 else self._tokens_to_map(h, size) for h in self._states(out)]

    def _tokens_to_map(self, tokens: torch.Tensor, size) -> torch.Tensor:
        if self.patch is None:
            raise ConfigError(f"{type(self.model).__name__}: token features without a config.patch_size, so their "
                              "grid is unknown")
        grid_h, grid_w = size[0] // self.patch[0], size[1] // self.patch[1]
        prefix = tokens.shape[1] - grid_h * grid_w  # class, distillation or register tokens come first
        if prefix < 0:
            raise ConfigError(f"{type(self.model).__name__}: {tokens.shape[1]} tokens for a {grid_h}x{grid_w} grid")
        return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_h, grid_w)

    def _roles(self, shapes: list[tuple[int, ...]], num_labels: int, native_maps: bool) -> FeatureInfo:
        blocks = list(range(1, len(shapes)))
        groups: list[list[int]] = []
        for j in blocks:
            if groups and shapes[groups[-1][-1]] == shapes[j]:
                groups[-1].append(j)
            else:
                groups.append([j])
        if len(groups) == 1:  # one resolution (a plain ViT): equal groups of consecutive blocks
            count = min(MAX_TOKEN_STAGES, len(blocks))
            groups = [blocks[i * len(blocks) // count:(i + 1) * len(blocks) // count] for i in range(count)]
        side = self.input_size[1]
        stages = tuple(
            StageInfo(name=f"hidden.{g[-1]}", channels=shapes[g[-1]][0], reduction=_reduction(side, shapes[g[-1]][1]),
                      blocks=tuple(f"hidden.{j}" for j in g), block_preacts=(None,) * len(g), preact=None,
                      next_preact=None)
            for g in groups)
        classifier = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)
                      and m.out_features == num_labels]
        if not classifier:
            raise ConfigError(f"{type(self.model).__name__}: no Linear layer gives the {num_labels} logits")
        linear = self.model.get_submodule(classifier[-1])
        # a CNN (its hidden states are maps): RDR's default site is its last conv; a transformer has none
        convs = [n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)] if native_maps else []
        return FeatureInfo(stages=stages, prepool=stages[-1].name, prepool_preact=None,
                           pooled=f"model.{classifier[-1]}:input", channels=linear.in_features,
                           last_conv=f"model.{convs[-1]}" if convs else None, classifier=f"model.{classifier[-1]}")


def _reduction(side: int, out_side: int) -> int:
    """The designed reduction: the power of two nearest side / out_side (a 28-px input gives 7, 4, 2, 1 maps
    for reductions 4, 8, 16, 32)."""
    return 2 ** max(0, round(math.log2(side / out_side)))


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return None
    return (value, value) if isinstance(value, int) else tuple(value)


# -- timm, torchvision, import paths -----------------------------------------------------------------------------
class LogitsOf(nn.Module):
    """Wraps a model whose forward returns a ModelOutput, dict or tuple, so that it returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, `.logits` / `["logits"]`, or a tuple's first entry."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"the model's forward returns a {type(out).__name__} without logits")


def _with_roles(model: nn.Module, info: FeatureInfo | None, size: tuple[int, int, int],
                wrap: bool = False) -> nn.Module:
    """`model`, wrapped by LogitsOf when its output is not a tensor (or `wrap`), carrying `info` as its
    `feature_info`."""
    adapted = model if _returns_tensor(model, size) and not wrap else LogitsOf(model)
    if info is not None and adapted is not model:
        object.__setattr__(adapted, "feature_info", _under(info, "model."))
    elif info is not None and getattr(model, "feature_info", None) != info:  # a zoo model has its own
        object.__setattr__(adapted, "feature_info", info)
    return adapted


def _returns_tensor(model: nn.Module, size: tuple[int, int, int]) -> bool:
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *size, dtype=param.dtype if param is not None else None))
    finally:
        model.train(was_training)
    logits_of(out)  # refuse an output without logits now, not in the first training step
    return isinstance(out, torch.Tensor)


def _under(info: FeatureInfo, prefix: str) -> FeatureInfo:
    def name(n: str | None) -> str | None:
        return None if n is None else prefix + n

    stages = tuple(StageInfo(name(s.name), s.channels, s.reduction, tuple(prefix + b for b in s.blocks),
                             tuple(map(name, s.block_preacts)), name(s.preact), name(s.next_preact),
                             tuple(map(name, s.block_next_preacts)), tuple(map(name, s.block_next_preact_bns)))
                   for s in info.stages)
    return FeatureInfo(stages, name(info.prepool), name(info.prepool_preact), name(info.pooled), info.channels,
                       name(info.last_conv), name(info.classifier))


def timm_roles(model: nn.Module, num_classes: int) -> FeatureInfo | None:
    """Roles from a timm model's `feature_info` (a list of {module, num_chs, reduction}); None without one."""
    entries = getattr(model, "feature_info", None)
    if not entries:
        return None
    entries = [dict(e) for e in entries]
    stages = tuple(StageInfo(e["module"], int(e["num_chs"]), int(e["reduction"]), (e["module"],), (None,), None, None)
                   for e in entries)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    path = next((n for n, m in model.named_modules() if m is classifier), None)
    if path is None or not isinstance(classifier, nn.Linear) or classifier.out_features != num_classes:
        return None
    return FeatureInfo(stages, stages[-1].name, None, f"{path}:input", classifier.in_features, None, path)


def torchvision_roles(model: nn.Module) -> FeatureInfo | None:
    """Roles for torchvision's ResNet layout (`layer1`..`layer4`, `fc`); None for other families."""
    names = [f"layer{i}" for i in range(1, 5)]
    if not all(hasattr(model, n) for n in names) or not isinstance(getattr(model, "fc", None), nn.Linear):
        return None
    stages = []
    for i, n in enumerate(names):
        layer = getattr(model, n)
        last = layer[-1]
        convs = [c for c, m in last.named_children() if isinstance(m, nn.Conv2d)]
        channels = getattr(last, convs[-1]).out_channels
        blocks = tuple(f"{n}.{j}" for j in range(len(layer)))
        stages.append(StageInfo(n, channels, 4 * 2 ** i, blocks, (None,) * len(blocks), None, None))
    return FeatureInfo(tuple(stages), "layer4", None, "fc:input", model.fc.in_features, None, "fc")


def _build_from_module(name: str, target: str, num_classes: int, in_channels: int, size: tuple[int, int, int],
                       kwargs: dict[str, Any]) -> nn.Module:
    path, _, attr = target.rpartition(":")
    if not path or not attr:
        raise ConfigError(f"model {name!r}: write module:<package.module>:<factory>")
    try:
        factory: Callable[..., nn.Module] = getattr(importlib.import_module(path), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model {name!r}: cannot import {attr!r} from {path!r} ({exc})") from None
    accepted = _parameters(factory)
    given = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in accepted and key not in given:
            given[key] = value
    model = factory(**given)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    info = getattr(model, "feature_info", None)
    return _with_roles(model, info if isinstance(info, FeatureInfo) else None, size)


def _parameters(factory: Callable) -> set[str]:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {"num_classes", "in_channels"}
    return {p.name for p in parameters}
