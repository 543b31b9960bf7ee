"""Shared test fixtures and the one tiny run the integration tests start from.

`TINY` is the small digits run (resnet8, ce, 200 training images, one epoch); a test lays the settings it depends on
over it as `key=value` changes, parsed like `--set`: `tiny_run` gives the validated config, `tiny_config` the YAML
file for the CLI. `digits_teacher` is a resnet14 trained once per session on digits, for the tests that need a
teacher with some skill; `untrained_digits_teacher` is a seeded resnet8 given a single epoch (`fit_to_digits`), for
those that need only its shapes (a run refuses a teacher at chance). Test modules import the helpers with
`from conftest import ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import yaml
from rich.console import Console

from distillab import methods, models
from distillab.config import TrainConfig
from distillab.config_files import load_config
from distillab.data.digits import load_digits
from distillab.engine.checkpoint import save_safetensors
from distillab.engine.trainer import Trainer
from distillab.run import train_run

if TYPE_CHECKING:
    from distillab.config import RunConfig

TINY = (
    "student.name=resnet8", "method.name=ce",
    "data.name=digits", "data.val_size=100", "data.train_subset=200", "data.augment.crop_padding=1",
    "data.augment.flip=false",
    "train.epochs=1", "train.batch_size=64", "train.progress=false",
)
DIGITS_TEACHER = "resnet14"  # the model `digits_teacher` trains


def _lay_over(tree: dict[str, Any], changes: tuple[str, ...]) -> dict[str, Any]:
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep:
            raise ValueError(f"{change!r}: expected key=value")
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            if not isinstance(node.get(section), dict):
                node[section] = {}
            node = node[section]
        node[leaf] = yaml.safe_load(value)
    return tree


def tiny_settings(*changes: str) -> dict[str, Any]:
    """The nested settings of `TINY` with `changes` laid over it in order (later ones win). A change is
    `a.b.c=value` with the value parsed as YAML, as `--set` does; an empty value is null (`data.train_subset=`
    trains on the whole training split)."""
    return _lay_over({}, (*TINY, *changes))


def tiny_run(directory: Path, name: str, *changes: str) -> RunConfig:
    """The tiny run as a validated config (nothing written); its run directory is `<directory>/runs/<name>`."""
    tree = _lay_over({**tiny_settings(), "output_dir": str(Path(directory) / "runs"), "name": name}, changes)
    return load_config(None, base=tree)


def tiny_config(directory: Path, name: str | None, *changes: str) -> Path:
    """Write the tiny run as `<directory>/<name>.yaml` and return its path; the run directory is
    `<directory>/runs/<name>`. With name None the file is `config.yaml` and names no run (give `--set name=...`)."""
    tree = {**tiny_settings(), "output_dir": str(Path(directory) / "runs")}
    if name is not None:
        tree["name"] = name
    path = Path(directory) / f"{name or 'config'}.yaml"
    path.write_text(yaml.safe_dump(_lay_over(tree, changes), sort_keys=False))
    return path


def teacher_changes(checkpoint: str | Path, name: str = DIGITS_TEACHER) -> tuple[str, str]:
    """The changes that make a run distil from `checkpoint` (a run directory or weights file) of model `name`."""
    return f"teacher.name={name}", f"teacher.checkpoint={checkpoint}"


def fit_to_digits(model: torch.nn.Module, epochs: int = 1, lr: float = 0.01) -> torch.nn.Module:
    """`model`, a classifier of 1x8x8 digits, after `epochs` of ce (AdamW, constant `lr`, no augmentation, one
    thread) on the digits training split: far above chance (40 to 97 % test for the networks of these tests), where
    an untrained one is at chance, which a run refuses in a teacher. Trained in place and returned."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(epochs=epochs, device="cpu", progress=False, optim={"name": "adamw", "lr": lr},
                          schedule={"name": "constant"})
        Trainer(methods.build("ce", model, input_shape=(1, 8, 8)), load_digits(), cfg, augment=None,
                console=Console(quiet=True)).fit()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(autouse=True)
def _two_threads():
    """Keep each test on the machine's cores and make CPU runs repeatable."""
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """The run directory of a resnet14 trained once per session (ce, 3 epochs, cosine) on the whole digits training
    split less 200 validation images: a teacher with real skill (far above the 10 % of chance), on one thread so
    that it is the same teacher whatever ran before it."""
    cfg = tiny_run(tmp_path_factory.mktemp("digits_teacher"), "teacher", f"student.name={DIGITS_TEACHER}",
                   "data.val_size=200", "data.train_subset=", "train.epochs=3", "train.schedule.name=cosine")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg.run_dir


@pytest.fixture(scope="session")
def untrained_digits_teacher(tmp_path_factory) -> str:
    """A seeded resnet8 for 1x8x8 digits, barely trained (`fit_to_digits`), as a weights file: for tests of a
    method's mechanics, which need the teacher's shapes, not its skill (but runs refuse a teacher at chance)."""
    path = tmp_path_factory.mktemp("untrained_teacher") / "teacher.safetensors"
    torch.manual_seed(5)
    save_safetensors(fit_to_digits(models.build("resnet8", num_classes=10, in_channels=1)), path)
    return str(path)


def shrink_demo(monkeypatch) -> None:
    """The demo on a resnet8 teacher trained 3 epochs (above chance) and 1-epoch students on 100 images."""
    from distillab import demo

    real = demo.demo_configs

    def tiny(output_dir, seeds=1):
        teacher, students = real(output_dir, seeds)

        def shrink(cfg, epochs, subset):
            return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs}),
                                          "data": cfg.data.model_copy(update={"train_subset": subset})})

        return shrink(teacher, 3, None), [shrink(c, 1, 100) for c in students]

    monkeypatch.setattr(demo, "TEACHER", "resnet8")
    monkeypatch.setattr(demo, "demo_configs", tiny)
