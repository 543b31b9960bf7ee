"""FeatureTap: read intermediate tensors of any `nn.Module` by module name, through forward hooks.

    with FeatureTap(model, ["stages.2", "head.fc"]) as tap:
        logits = model(x)
    feature = tap["stages.2"]

A name ending in `:input` records the module's (first) input instead of its output, e.g.
`stages.2.0.relu:input` for a pre-activation feature.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from torch import nn

from distillab.errors import UnknownNameError

INPUT_SUFFIX = ":input"


class FeatureTap:
    """Forward hooks that keep the latest output (or input) of named sub-modules.

    Usable as a context manager (hooks removed on exit) or kept for the life of a method
    (call `close()` to remove the hooks). Values are overwritten on each forward pass.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.names = list(dict.fromkeys(names))
        self._values: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in self.names:
            module_name, want_input = _split(name)
            if module_name not in modules:
                close = difflib.get_close_matches(module_name, [m for m in modules if m], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UnknownNameError(
                    f"{type(model).__name__} has no module named {module_name!r}{hint}"
                )
            self._handles.append(modules[module_name].register_forward_hook(self._hook(name, want_input)))

    def _hook(self, name: str, want_input: bool):
        def record(_module: nn.Module, inputs: tuple, output) -> None:
            self._values[name] = inputs[0] if want_input else output

        return record

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._values[name]
        except KeyError:
            if name not in self.names:
                raise KeyError(f"{name!r} is not tapped; tapped names: {self.names}") from None
            raise KeyError(f"{name!r} has not been computed: run a forward pass first") from None

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def values(self) -> list[torch.Tensor]:
        """The tapped tensors in the order the names were given."""
        return [self[n] for n in self.names]

    def take(self) -> list[torch.Tensor]:
        """The tapped tensors in name order, forgetting them (so the graph is not kept alive)."""
        out = self.values()
        self._values.clear()
        return out

    def clear(self) -> None:
        self._values.clear()

    def fill(self, values: dict[str, torch.Tensor]) -> None:
        """Record `values` as if a forward pass had produced them (a cached teacher's answer)."""
        self._values.update(values)

    def rebind(self, model: nn.Module) -> None:
        """Hook the same names on `model` instead (a copy of the model the tap was made on, e.g. a folded teacher)."""
        self.close()
        self._values.clear()
        self.__init__(model, self.names)

    def close(self) -> None:
        """Remove the hooks; values already recorded stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _split(name: str) -> tuple[str, bool]:
    if name.endswith(INPUT_SUFFIX):
        return name[: -len(INPUT_SUFFIX)], True
    return name, False


def feature_shapes(model: nn.Module, names: Iterable[str], input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Shapes (without batch) of the named features for one input of `input_shape`, by a dry run in eval mode."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with FeatureTap(model, names) as tap, torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=param.dtype, device=param.device))
            return {n: tuple(tap[n].shape[1:]) for n in tap.names}
    finally:
        model.train(was_training)
