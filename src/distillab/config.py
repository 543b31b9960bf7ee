"""Run configuration: the pydantic schema, run-name rules and error formatting (reading YAML files, `base:`,
overrides and the registry checks live in `distillab.config_files`).

Every model forbids unknown keys, so a misspelt field is an error that names the field. This module imports
nothing of distillab but `errors`, so that every layer may use it.
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


def refuse_bool_numbers(model: type[BaseModel], field: str, value: Any) -> Any:
    """`true` where a number is expected is an error, not 1 (pydantic's lax mode would take it as 1)."""
    if isinstance(value, bool) and _numeric_only(model.model_fields[field].annotation):
        raise ValueError("a boolean is not a number")
    return value


def _numeric_only(annotation: Any) -> bool:
    """Whether a field's type takes int or float but not bool (looking through Optional and Annotated)."""
    types: list[Any] = []
    todo = [annotation]
    while todo:
        t = todo.pop()
        if get_origin(t) in (Union, UnionType, Annotated):
            todo.extend(get_args(t)[:1] if get_origin(t) is Annotated else get_args(t))
        else:
            types.append(t)
    return bool not in types and any(t in (int, float) for t in types)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_numbers(cls, info.field_name, value)


MAX_CHANNELS = 64
MAX_IMAGE_SIDE = 4096
MAX_SYNTHETIC_BYTES = 4 << 30  # the synthetic images are held in memory as uint8


class AugmentConfig(StrictModel):
    """Batch augmentation done on the device: random crop with zero padding, horizontal flip."""

    crop_padding: int = Field(4, ge=0, le=MAX_IMAGE_SIDE, description="pixels of zero padding before the random "
                              "crop (at most the image's side); 0 = off")
    flip: bool = Field(True, description="random horizontal flip with probability 1/2")


class SyntheticConfig(StrictModel):
    """Random images and labels of a given shape: for throughput measurements, never for accuracy."""

    image_shape: tuple[Annotated[int, Field(gt=0, le=MAX_CHANNELS)], Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)],
                       Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]] = (3, 32, 32)
    num_classes: int = Field(100, gt=1, le=1_000_000)
    train_size: int = Field(2048, gt=0)
    test_size: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SyntheticConfig:
        c, h, w = self.image_shape
        size = (self.train_size + self.test_size) * c * h * w
        if size > MAX_SYNTHETIC_BYTES:
            raise ValueError(f"{self.train_size + self.test_size:,} images of {c}x{h}x{w} take {size / 2**30:,.1f} "
                             f"GiB, over the {MAX_SYNTHETIC_BYTES >> 30} GiB limit of synthetic data: lower "
                             "train_size, test_size or image_shape")
        return self


class DataConfig(StrictModel):
    name: str = Field("digits", description="a registered dataset: digits, fashion_mnist, cifar10, cifar100, "
                      "synthetic, or one a module registers (distillab.data.registry.register)")
    root: Path | None = Field(None, description="folder holding (or receiving) the dataset files")
    download: bool = Field(True, description="download missing files from the official site when online")
    verify_md5: bool = Field(True, description="check CIFAR files against the official md5s; false accepts a "
                             "copy that differs (repacked, converted), with a warning")
    val_size: int = Field(0, ge=0, description="training images held out as a validation split")
    train_subset: int | None = Field(None, gt=0, description="use a seeded random subset of the training set")
    test_subset: int | None = Field(None, gt=0, description="use the first N test images")
    split_seed: int = Field(0, ge=0, lt=2**63, description="seed of the validation split and the subsets")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="used by name: synthetic")


class ModelConfig(StrictModel):
    name: str
    checkpoint: Path | None = Field(
        None, description="weights: a run directory, a .pt/.pth state dict, or a .safetensors file"
    )
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$",
                               description="expected SHA-256 of the weights file; a different file is refused")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments of the zoo factory")

    @field_validator("kwargs")
    @classmethod
    def _not_set_by_the_data(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(kwargs) & {"num_classes", "in_channels", "input_size"})
        if taken:
            raise ValueError(f"{', '.join(taken)} come{'s' if len(taken) == 1 else ''} from the data, not from kwargs: "
                             "remove " + ("it" if len(taken) == 1 else "them"))
        return kwargs


class MethodConfig(StrictModel):
    name: str = "kd"
    options: dict[str, Any] = Field(default_factory=dict, description="the method's own options")


class OptimConfig(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm; null = off")


class ScheduleConfig(StrictModel):
    name: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] | None = Field(
        None, description="epochs after which the LR is multiplied by gamma; null = 62.5/75/87.5% of the run "
        "(150/180/210 of 240, the CIFAR protocol)")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from 0, in (fractional) epochs")
    min_lr: float = Field(0.0, ge=0, description="floor of the cosine schedule")

    @model_validator(mode="after")
    def _milestones_increase(self) -> ScheduleConfig:
        if self.milestones is None:
            return self
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"milestones must increase strictly, got {self.milestones}")
        if any(m <= 0 for m in self.milestones):
            raise ValueError(f"milestones are epochs counted from 1, got {self.milestones}")
        return self


PROTOCOL_MILESTONES = (150 / 240, 180 / 240, 210 / 240)


def step_milestones(cfg: ScheduleConfig, epochs: int) -> list[int]:
    """The step schedule's milestones; by default the CIFAR protocol's, scaled to `epochs`."""
    if cfg.milestones is not None:
        return cfg.milestones
    return [round(f * epochs) for f in PROTOCOL_MILESTONES]


class TrainConfig(StrictModel):
    epochs: int = Field(240, gt=0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    drop_last: bool = Field(False, description="drop the last partial batch of each epoch (always under compile, "
                            "where it would recompile the step; the shuffle rotates which images are dropped)")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA, off on CPU")
    compile: bool = Field(False, description="torch.compile the method's training step")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode; reduce-overhead captures the step in CUDA graphs (static "
        "shapes: the partial batch is dropped under compile)")
    channels_last: bool = Field(True, description="channels-last memory format (faster on the 2-core CPU too)")
    deterministic: bool = Field(False, description="torch's deterministic algorithms, for the whole process "
                                "(slower on GPU; an op without one is an error)")
    cache_teacher: bool = Field(True, description="without augmentation (or with teacher_views), compute the "
                                "frozen teacher's outputs once and look them up each epoch (methods that read the "
                                "teacher only through teacher_forward; at most teacher_cache_gib)")
    teacher_views: int | None = Field(None, ge=1, le=1024, description="K fixed augmented views per training image "
                                      "(crop and flip drawn once from the seed), one shown each epoch: the teacher's "
                                      "outputs for all K are then cached (engine/teacher_cache.py). A finite view "
                                      "set, not unlimited augmentation. None: a fresh crop and flip each epoch")
    teacher_cache_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="the teacher cache's storage type (half precision halves its memory; answers are "
        "converted back, with the rounding error docs/benchmarks.md measures)")
    teacher_cache_gib: float = Field(4.0, gt=0, description="the teacher cache's memory limit: a larger cache of "
                                     "teacher_views is refused before any work; without views the teacher runs "
                                     "each step instead")
    fold_teacher_bn: bool = Field(False, description="fold the frozen teacher's BatchNorms into its convs (exact up "
                                  "to float rounding; checked on a batch, skipped when the teacher is cached)")
    tensorboard: bool = Field(False, description="the tensorboard tracker (the same as listing it in trackers)")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="where the numbers go besides metrics.jsonl and metrics.csv "
        "(distillab.engine.trackers)")
    progress: bool = Field(True, description="rich progress bar")
    checkpoint_every: int = Field(1, gt=0, description="epochs between checkpoints")
    eval_every: int = Field(1, gt=0, description="epochs between val/test evaluations; the last epoch is "
                            "always evaluated")
    log_steps: bool = Field(False, description="write steps.jsonl: every step's loss terms (a sync per step)")
    sync_bn: bool = Field(False, description="SyncBatchNorm across data-parallel ranks (CUDA only)")
    find_unused_parameters: bool = Field(False, description="DDP option for methods with parameters unused "
                                         "in some steps")

    @property
    def tracker_names(self) -> list[str]:
        return list(dict.fromkeys([*self.trackers, *(["tensorboard"] if self.tensorboard else [])]))

    @model_validator(mode="after")
    def _milestones_inside_run(self) -> TrainConfig:
        milestones = self.schedule.milestones or []
        if self.schedule.name == "step" and any(m > self.epochs for m in milestones):
            raise ValueError(
                f"schedule.milestones {self.schedule.milestones} lie beyond epochs={self.epochs}; "
                "set train.schedule.milestones to epochs inside the run"
            )
        if self.schedule.warmup_epochs > self.epochs:
            raise ValueError(f"schedule.warmup_epochs={self.schedule.warmup_epochs} exceeds epochs={self.epochs}")
        return self


MAX_RUN_NAME_BYTES = 200


def check_run_name(name: str) -> str:
    """A run name is one directory name inside `output_dir`: no separators, not `.`/`..`, bounded length."""
    problem = None
    if not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "names a directory outside the run"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif any(ord(c) < 32 for c in name):
        problem = "contains a control character"
    elif len(name.encode()) > MAX_RUN_NAME_BYTES:
        problem = f"is longer than {MAX_RUN_NAME_BYTES} bytes"
    if problem:
        raise ValueError(f"run name {name!r} {problem}: a run name is one directory name inside output_dir")
    return name


class RunConfig(StrictModel):
    imports: list[str] = Field(default_factory=list, description="modules imported before the config is validated: "
                               "plug-ins that register methods, models or datasets (they run code: a config read "
                               "back from a run directory imports them only with --allow-code)")
    name: str | None = Field(None, description="run directory name (one path component); "
                             "default <method>_<student>_<data>_s<seed>")
    output_dir: Path = Path("runs")
    seed: int = Field(0, ge=0, lt=2**63, description="the run's seed (student init, data order, augmentation)")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelConfig | None = None
    student: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _name_is_one_component(cls, name: str | None) -> str | None:
        return None if name is None else check_run_name(name)

    @model_validator(mode="after")
    def _derived_name_is_one_component(self) -> RunConfig:
        check_run_name(self.run_name)
        return self

    @model_validator(mode="after")
    def _views_need_augmentation(self) -> RunConfig:
        augment = self.data.augment
        if (self.train.teacher_views or 1) > 1 and not (augment.crop_padding or augment.flip):
            raise ValueError(f"train.teacher_views={self.train.teacher_views} without augmentation "
                             "(data.augment.crop_padding 0, flip false): every view would be the same image; turn "
                             "crop or flip on, or leave teacher_views unset")
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{self.method.name}_{self.student.name}_{self.data.name}_s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name


def format_validation_error(err: ValidationError, model: type[BaseModel], where: str = "") -> str:
    """One line per problem: `field.path: what is wrong (got value)`, with a suggestion for misspelt keys."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(e["loc"][-1]), _known_keys(model, e["loc"][:-1]), n=1)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {reprlib.repr(e['input'])})"
        lines.append(f"{where}{loc}: {msg}" if loc else f"{where}{msg}")
    return "; ".join(lines)


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)
