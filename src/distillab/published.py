"""Published teachers by name: the CIFAR-100 teachers that mdistiller and RepDistiller released, and the
Fashion-MNIST teachers shipped inside this package.

A config names one as `checkpoint: published:NAME`; the name, and the model it is for, are checked with the config
(`check_config`), and `resolve` gives its file: the packaged one, or the one `distillab teachers fetch NAME`
(`distillab.teacher_fetch`) wrote into the cache. This module imports nothing of distillab but `errors`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillab.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from distillab.config import ModelConfig, RunConfig

PREFIX = "published:"
PACKAGED_TEACHERS = Path(__file__).parent / "teachers"  # the shipped teachers, also in an installed wheel

MDISTILLER_TAR = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
REPDISTILLER_URL = "http://shape2prog.csail.mit.edu/repo/{folder}/ckpt_epoch_240.pth"
# The six CIFAR-100 teachers both releases hold (RepDistiller's scripts/fetch_pretrained_teachers.sh, mdistiller's
# cifar_model_dict): each in <arch>_vanilla/ckpt_epoch_240.pth, where <arch> is also our zoo's name.
CIFAR100_ARCHS = ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50")
# SHA-256 of the checkpoint files (the tar members for mdistiller). Neither project publishes checksums. For
# resnet32x4 several public reproduction scripts pin one value, for RepDistiller's URL and for the member of
# mdistiller's tar alike (the same file, released twice). The rest are unknown: `fetch` prints what it computed
# and says that it could not be verified.
KNOWN_SHA256 = {
    ("mdistiller", "resnet32x4"): "22aa12e2b632b19ddde155ccf2388671842ddd304824b3095e0a7fff364beb4f",
    ("repdistiller", "resnet32x4"): "22aa12e2b632b19ddde155ccf2388671842ddd304824b3095e0a7fff364beb4f",
}


@dataclass(frozen=True)
class PublishedTeacher:
    """One published teacher: which zoo model it is, for which data, and where its weights come from."""

    name: str
    model: str
    dataset: str
    num_classes: int
    in_channels: int
    source: str  # who published it
    url: str | None = None  # None: shipped inside the package (`shipped`)
    member: str | None = None  # the checkpoint's path inside a tar release (its last folders)
    sha256: str | None = None  # of the checkpoint file (the tar member); None where no public source gives it
    kwargs: dict[str, Any] = field(default_factory=dict)  # what the zoo factory needs besides the data's shape
    shipped: str | None = None  # the package folder holding it
    trained_by: str | None = None  # the shipped config that trains it
    budget: str | None = None  # the shipped config layer that distils from it

    @property
    def tar_release(self) -> bool:
        return self.url is not None and self.url.endswith(".tar")

    @property
    def download_name(self) -> str:
        """The file a download is kept as in the cache (a tar is shared by the teachers it holds)."""
        assert self.url is not None
        return Path(self.url).name if self.tar_release else f"{self.name}{Path(self.url).suffix}"

    def path(self) -> Path:
        """Where its weights are: the packaged run directory, or the converted file in the cache."""
        return PACKAGED_TEACHERS / self.shipped if self.shipped else cache_dir() / f"{self.name}.safetensors"

    def available(self) -> bool:
        return self.path().exists()


def _cifar100(arch: str, source: str) -> PublishedTeacher:
    folder = f"{arch}_vanilla"
    if source == "mdistiller":
        return PublishedTeacher(f"cifar100_{arch}", arch, "cifar100", 100, 3, "mdistiller", MDISTILLER_TAR,
                                f"{folder}/ckpt_epoch_240.pth", KNOWN_SHA256.get((source, arch)),
                                trained_by=f"configs/cifar100/teachers/{arch}.yaml")
    return PublishedTeacher(f"cifar100_{arch}_repdistiller", arch, "cifar100", 100, 3, "RepDistiller",
                            REPDISTILLER_URL.format(folder=folder), f"{folder}/ckpt_epoch_240.pth",
                            KNOWN_SHA256.get((source, arch)), trained_by=f"configs/cifar100/teachers/{arch}.yaml")


VIT_CONV = {"image_size": 28, "patch_size": 4, "dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 2.0, "stages": 3,
            "conv_stem": True}
TEACHERS: dict[str, PublishedTeacher] = {t.name: t for t in [
    *(_cifar100(arch, "mdistiller") for arch in CIFAR100_ARCHS),
    *(_cifar100(arch, "repdistiller") for arch in CIFAR100_ARCHS),
    PublishedTeacher("fashion_mnist_resnet20", "resnet20", "fashion_mnist", 10, 1, "distillab",
                     sha256="7b6e5b589d9f9e9b5c4e11692b81ad53c142a0d0f0f7955dd8fd9bdefb9dcb2e",
                     shipped="fashion_mnist_resnet20", trained_by="configs/fashion_mnist/teacher_resnet20_full.yaml",
                     budget="configs/fashion_mnist/_converged.yaml"),
    PublishedTeacher("fashion_mnist_resnet56", "resnet56", "fashion_mnist", 10, 1, "distillab",
                     sha256="2174c4bef936b4c856c882f428f1e8981f7ae418bc3e5caac0b69c8c6581c3e7",
                     shipped="fashion_mnist_resnet56", trained_by="configs/fashion_mnist/teacher_resnet56_full.yaml"),
    PublishedTeacher("fashion_mnist_vit_conv", "vit_tiny", "fashion_mnist", 10, 1, "distillab",
                     sha256="7d43bff15cc94bbc385dda46d66a3b4ff5c131f593b2541f007f2d911230d56c", kwargs=VIT_CONV,
                     shipped="fashion_mnist_vit_conv", trained_by="configs/fashion_mnist/teacher_vit_conv.yaml",
                     budget="configs/fashion_mnist/_converged_vit.yaml"),
]}


def cache_dir() -> Path:
    """Where fetched teachers go: $DISTILLAB_HOME/teachers, else ~/.cache/distillab/teachers ($XDG_CACHE_HOME
    for ~/.cache when set)."""
    home = os.environ.get("DISTILLAB_HOME")
    if home:
        return Path(home).expanduser() / "teachers"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "distillab" / "teachers"


def get(name: str) -> PublishedTeacher:
    """The published teacher `name`; an unknown one is a ConfigError with the closest name."""
    if name not in TEACHERS:
        close = difflib.get_close_matches(name, TEACHERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown published teacher {name!r}{hint} (see `distillab teachers`)")
    return TEACHERS[name]


def published_name(checkpoint: Path | str | None) -> str | None:
    """NAME of a `published:NAME` checkpoint, else None."""
    text = "" if checkpoint is None else str(checkpoint)
    return text[len(PREFIX):] if text.startswith(PREFIX) else None


def check_config(cfg: RunConfig, where: str = "") -> None:
    """A config's `published:` checkpoints name published teachers, of the model the config names (with the
    kwargs it needs): checked with the config, before anything is loaded."""
    for role in ("teacher", "student"):
        spec: ModelConfig | None = getattr(cfg, role)
        if spec is None or spec.checkpoint is None:
            continue
        text = str(spec.checkpoint)
        name = published_name(text)
        if name is None:
            prefix, sep, rest = text.partition(":")
            if sep and rest and len(prefix) > 3 and difflib.get_close_matches(prefix, [PREFIX[:-1]], n=1):
                raise ConfigError(f"{where}{role}.checkpoint: {text!r} is no file; did you mean "
                                  f"'{PREFIX}{rest}'? (see `distillab teachers`)")
            continue
        try:
            entry = get(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}{role}.checkpoint: {exc}") from None
        if spec.name != entry.model:
            raise ConfigError(f"{where}{role}.checkpoint: {PREFIX}{name} is a {entry.model}, but {role}.name is "
                              f"{spec.name!r}: set {role}.name: {entry.model}")
        if entry.kwargs and spec.kwargs != entry.kwargs:
            raise ConfigError(f"{where}{role}.kwargs: {PREFIX}{name} is a {entry.model} built with kwargs "
                              f"{entry.kwargs}; set {role}.kwargs to them")


def resolve(checkpoint: Path, role: str = "teacher") -> Path:
    """The file or run directory a config's checkpoint names: `published:NAME` is the shipped or fetched file (a
    CheckpointError with the fetch command while it has not been fetched); a missing `teachers/...` path is the
    shipped teacher of that name (so the shipped configs work outside a clone); anything else is as given."""
    name = published_name(checkpoint)
    if name is not None:
        entry = get(name)
        if not entry.available():
            own = (f", or train your own with `distillab train {entry.trained_by}` and set {role}.checkpoint to "
                   "its run directory") if entry.trained_by else ""
            raise CheckpointError(f"{role}.checkpoint {PREFIX}{name} has not been fetched yet: run `distillab "
                                  f"teachers fetch {name}` (it downloads {entry.url}){own}")
        return entry.path()
    path = Path(checkpoint).expanduser()
    if not path.exists() and not path.is_absolute() and path.parts[:1] == ("teachers",) and len(path.parts) > 1:
        packaged = PACKAGED_TEACHERS.joinpath(*path.parts[1:])
        if packaged.exists():
            return packaged
    return Path(checkpoint)


def missing_teacher_hint(cfg: RunConfig, trainer: str | None) -> str:
    """How to get the teacher a config names when its checkpoint does not exist: `trainer`, the shipped config that
    trains it (`config_files.config_that_trains`), a shipped teacher of the same model and data, a published one to
    fetch."""
    assert cfg.teacher is not None
    teacher = cfg.teacher
    ways = [f"train it (`distillab train {trainer}`)" if trainer else
            f"train one (method ce, student.name {teacher.name}, on {cfg.data.name}) and point teacher.checkpoint at "
            "its run directory"]
    same = [e for e in TEACHERS.values() if e.model == teacher.name and e.dataset == cfg.data.name]
    for entry in (e for e in same if e.shipped):
        by_name = "" if entry.kwargs != teacher.kwargs else f", or `--set teacher.checkpoint={PREFIX}{entry.name}`"
        ways.append(f"use the shipped one (add `--budget {entry.budget}` to the command{by_name})")
    fetchable = [e for e in same if not e.shipped]
    if fetchable:
        first, others = fetchable[0], "".join(f"; or {e.name}, {e.source}'s" for e in fetchable[1:])
        ways.append(f"fetch a published one: `distillab teachers fetch {first.name}` ({first.source}'s{others}), "
                    f"then add `--set teacher.checkpoint={PREFIX}{first.name}`")
    return "to get one: " + "; or ".join(ways)
