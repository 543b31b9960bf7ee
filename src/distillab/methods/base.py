"""The Method contract and the method registry.

A method is an `nn.Module` built from `(student, teacher, **options)`. It owns its side modules
(connectors, regressors, ...), so they are trained, checkpointed and wrapped for DDP with the
student, and never leak into the student's own state dict. `forward(images, labels)` returns the
student logits and a dict of *weighted* named loss terms; the trainer sums and logs them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator
from torch import nn

from distillab.config import format_validation_error, refuse_bool_numbers
from distillab.errors import ConfigError
from distillab.features import FeatureTap, feature_shapes
from distillab.registry import Registry


class MethodOptions(BaseModel):
    """Base of every method's options; unknown keys are errors.

    Naming guide: `temperature` for a logit temperature, `<term>_weight` for the weight of the loss term logged as
    `<term>`, `student_layer(s)` / `teacher_layer(s)` for tap names. `renamed` maps an option's old name to its
    new one: the old name still works for one release, with a FutureWarning naming the new key.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _take_old_names(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.renamed.keys() & data.keys():
            return data
        data = dict(data)
        for old, new in cls.renamed.items():
            if old in data:
                if new in data:
                    raise ValueError(f"{old} is the old name of {new}: give {new} only")
                warnings.warn(f"method option {old} is deprecated: it is now {new} (the old name goes in the next "
                              "release)", FutureWarning, stacklevel=2)
                data[new] = data.pop(old)
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_numbers(cls, info.field_name, value)


class Method(nn.Module):
    """Base class: holds the student and a frozen teacher, validates options, defines the contract.

    Subclasses set `Options` (a `MethodOptions` subclass with the spec's defaults) and implement
    `forward`. `epoch` / `num_epochs` are set by the trainer before each epoch (0-based epoch),
    for methods with warm-ups. What a method may ask of the engine besides (dataset indices, a strong view, a
    bi-level search) are the mixins of `methods/capabilities.py`.
    """

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    requires_teacher: ClassVar[bool] = True
    distributed_ok: ClassVar[bool] = True  # False for methods with per-process state (memory banks)
    # True where the training forward runs the teacher only on the batch's images (`teacher_forward(images)` or
    # `self.teacher(images)`) and reads it only through that output and taps made by `tap(teacher, ...)`: the
    # engine may then stand a cache of its outputs in for the teacher (an instance may set it False)
    caches_teacher: ClassVar[bool] = False
    # the names of what `probe` reports on the validation split; none: the engine never calls it
    probes: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = ""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        input_shape: tuple[int, int, int] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.opts = validate_options(type(self), options)
        if teacher is None and self.requires_teacher:
            raise ConfigError(f"method {self.name!r} needs a teacher: set teacher.name (and teacher.checkpoint)")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.input_shape = tuple(input_shape or getattr(student, "input_size", (3, 32, 32)))
        self.epoch = 0
        self.num_epochs = 1
        # the epoch as a tensor for what the training step reads (warm-up ramps): a Python int there would make a
        # compiled step recompile every epoch
        self.register_buffer("epoch_tensor", torch.zeros(()), persistent=False)
        self._taps: list[FeatureTap] = []
        self.teacher_taps: list[FeatureTap] = []

    # -- contract -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @property
    def deployed_network(self) -> nn.Module:
        """The network this method deploys, as it trains (sharing the training parameters): what is evaluated
        during training. The plain student, unless the method ships more than the student."""
        return self.student

    def deploy(self) -> nn.Module:
        """The network a user ships: `deployed_network` in its deployment form (RDR: its branches merged). While
        the method lives, its feature taps stay hooked on it: call `close()` first to use it alone."""
        return self.deployed_network

    def deploy_card(self) -> dict[str, Any]:
        """What a model card needs, besides the student's name and kwargs, to rebuild `deploy()` (see
        `rebuild_deployed`); JSON data. Empty where the deployed network is the plain student."""
        return {}

    @classmethod
    def rebuild_deployed(cls, student: nn.Module, card: dict[str, Any]) -> nn.Module:
        """The network `deploy()` returns, rebuilt around a newly built `student` from `deploy_card()`'s entries
        (weights are loaded after). The student itself by default."""
        return student

    @property
    def deploy_folds_bn(self) -> bool:
        """Whether `deploy()` folds BatchNorms into convolutions, so that no stock model of the student's
        architecture takes its weights (an export then needs its graph: ONNX or torch.export)."""
        return False

    def close(self) -> None:
        """Remove the method's feature-tap hooks from the student and teacher (training is over)."""
        for tap in self._taps:
            tap.close()
            tap.clear()

    # -- life-cycle hooks (most methods need none) ---------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """State the method keeps outside its modules (its own optimizers, say), saved in every checkpoint."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def take_logs(self) -> dict[str, torch.Tensor]:
        """Values of the last step to log besides the loss terms (epoch means, as `log_<name>`); cleared here."""
        return {}

    def probe(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image values (shape B) of each of `probes` on evaluation images, called in eval mode without autograd
        and with the real teacher (never a cache of it). After each evaluation on the validation split the engine
        logs their means over the split as `val_probe_<name>`."""
        return {}

    def write_outputs(self, run_dir: Path) -> dict[str, Any]:
        """Write what the method produces besides the student into the finished run's directory (rank 0 only);
        returns entries for the run's summary."""
        return {}

    def set_progress(self, epoch: int, num_epochs: int) -> None:
        self.epoch, self.num_epochs = epoch, num_epochs
        self.epoch_tensor.fill_(epoch)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is frozen, whatever the wrapper's mode
        return self

    # -- helpers for subclasses -----------------------------------------------------------
    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits without autograd (taps on the teacher fill as a side effect)."""
        with torch.no_grad():
            return self.teacher(images)

    def replace_teacher(self, teacher: nn.Module) -> None:
        """Swap the frozen teacher for an equivalent one (its BNs folded, say): the method's taps move with it."""
        self.teacher = teacher.eval().requires_grad_(False)
        for tap in self.teacher_taps:
            tap.rebind(teacher)

    def tap(self, model: nn.Module, names: Iterable[str]) -> FeatureTap:
        """A feature tap kept for the life of the method."""
        tap = FeatureTap(model, names)
        self._taps.append(tap)
        if model is self.teacher:
            self.teacher_taps.append(tap)
        return tap

    def shapes(self, model: nn.Module, names: Iterable[str]) -> dict[str, tuple]:
        """Feature shapes (without batch) for one input of `input_shape`, by a dry forward pass."""
        return feature_shapes(model, names, self.input_shape)

    def side_modules(self) -> dict[str, nn.Module]:
        """Trainable modules owned by the method besides the student."""
        return {n: m for n, m in self.named_children() if n not in ("student", "teacher")}

    def side_parameter_count(self) -> int:
        return sum(p.numel() for m in self.side_modules().values() for p in m.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Student and side modules; the teacher is left out (it is loaded from its own file)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the method: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")


def validate_options(cls: type[Method], options: dict[str, Any]) -> MethodOptions:
    try:
        return cls.Options(**options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls.Options, "method.options.")) from None


METHODS: Registry[type[Method]] = Registry("method", "distillab.methods", Path(__file__).parent,
                                          "see `distillab methods`", skip=("base",))


def register(name: str):
    """Class decorator: register a Method subclass under `name`."""

    def add(cls: type[Method]) -> type[Method]:
        METHODS.register(name)(cls)
        cls.name = name
        return cls

    return add


def available() -> dict[str, type[Method]]:
    return METHODS.available()


def get(name: str) -> type[Method]:
    return METHODS.get(name)


def build(name: str, student: nn.Module, teacher: nn.Module | None = None, **options: Any) -> Method:
    """Build the registered method `name` with the spec's defaults, overridden by `options`."""
    return get(name)(student, teacher, **options)
