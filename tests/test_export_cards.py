"""Export cards rebuild every kind of student they are written for, from any working directory: an `hf:` one from
its transformers config, a `module:` one from its import name (only with allow_code), a timm one by name, a zoo one
as before; a card that cannot be rebuilt is one short line naming the model."""

from __future__ import annotations

import shutil
import sys
import types

import pytest
import torch
from torch import nn

from conftest import tiny_config, tiny_run
from distillab import models
from distillab.cli import main
from distillab.data import load_splits
from distillab.errors import CheckpointError
from distillab.export import CARD_VERSION, export_model, load_exported, model_card, read_card
from distillab.run import restore_method

DIGITS = (1, 8, 8)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4)


def deployed(run, allow_code: bool = False) -> nn.Module:
    """The run's deployed network, as `distillab export` writes it."""
    _, _, method, _ = restore_method(run, allow_code=allow_code)
    network = method.deploy()
    method.close()
    return network.eval()


def short_line(message: str, path) -> bool:
    """One line, short beside the file's path it starts with."""
    return "\n" not in message and message.startswith(str(path)) and len(message) - len(str(path)) < 300


@pytest.fixture
def digits(tmp_path):
    return load_splits(tiny_run(tmp_path, "data").data)


def test_an_hf_student_from_a_relative_directory_rebuilds_from_its_card_elsewhere(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    models.build("hf:vit", num_classes=10, in_channels=1, input_size=DIGITS, **VIT).model.save_pretrained("vit_dir")
    config = tiny_config(tmp_path, "hf_rel", "student.name='hf:vit_dir'")
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "hf_rel"
    assert main(["export", str(run)]) == 0
    assert main(["export", str(run), "--format", "torch-export"]) == 0
    file = run / "exported_student.safetensors"
    network = deployed(run)
    card = read_card(file)
    assert card["version"] == CARD_VERSION and card["model"] == "hf:vit_dir"
    assert card["hf_config"]["model_type"] == "vit" and len(card["hf_config"]["id2label"]) == 10
    assert set(card["packages"]) == {"transformers"}
    old = {k: v for k, v in card.items() if k not in ("hf_config", "packages")} | {"version": 2}
    export_model(network, tmp_path / "old.safetensors", old)  # a card as written before version 3
    x = torch.randn(3, *DIGITS)
    with torch.no_grad():
        expected = network(x)
        assert torch.equal(load_exported(tmp_path / "old.safetensors")(x), expected)  # read where it was written
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        shutil.rmtree(tmp_path / "vit_dir")  # the new card needs no directory at all
        assert torch.equal(load_exported(file)(x), expected)
        assert torch.allclose(torch.export.load(run / "exported_student.pt2").module()(x), expected, atol=1e-5)
    with pytest.raises(CheckpointError) as caught:
        load_exported(tmp_path / "old.safetensors")
    message = str(caught.value)
    assert "cannot rebuild its network 'hf:vit_dir'" in message and "card (version 2)" in message
    assert short_line(message, tmp_path / "old.safetensors")


NET = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
"""


def test_a_module_student_rebuilds_from_its_card_only_with_allow_code(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "card_test_nets.py").write_text(NET)
    monkeypatch.syspath_prepend(str(code))
    config = tiny_config(tmp_path, "mod", "student.name=module:card_test_nets:Net", "student.kwargs={width: 6}")
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "mod"
    assert main(["export", str(run), "--allow-code"]) == 0
    file = run / "exported_student.safetensors"
    network = deployed(run, allow_code=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"'module:card_test_nets:Net' is rebuilt by importing and running "
                                              r"code.*allow_code=True"):
        load_exported(file)
    x = torch.randn(3, *DIGITS)
    with torch.no_grad():
        assert torch.equal(load_exported(file, allow_code=True)(x), network(x))
    monkeypatch.delitem(sys.modules, "card_test_nets")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(code)])
    with pytest.raises(CheckpointError) as caught:
        load_exported(file, allow_code=True)
    message = str(caught.value)
    assert "cannot rebuild its network 'module:card_test_nets:Net'" in message
    assert "cannot import 'Net' from 'card_test_nets'" in message and short_line(message, file)


class _TimmNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_a_timm_student_rebuilds_by_name_and_a_missing_package_is_named(tmp_path, monkeypatch, digits):
    timm = types.SimpleNamespace(__version__="9.9-stand-in",
                                 create_model=lambda name, pretrained, num_classes, in_chans: _TimmNet(num_classes,
                                                                                                      in_chans))
    monkeypatch.setitem(sys.modules, "timm", timm)
    torch.manual_seed(0)
    student = models.build("timm:tiny", num_classes=10, in_channels=1, input_size=DIGITS).eval()
    card = model_card("timm:tiny", {}, digits, "kd", student=student)
    assert card["packages"] == {"timm": "9.9-stand-in"} and "hf_config" not in card
    export_model(student, tmp_path / "timm.safetensors", card)
    x = torch.randn(2, *DIGITS)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "timm.safetensors")(x), student(x))
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed where the file is read
    with pytest.raises(CheckpointError, match=r"'timm:tiny' from the card: needs the timm package.*\(the card was "
                                              r"written with timm 9\.9-stand-in\)"):
        load_exported(tmp_path / "timm.safetensors")


def test_a_zoo_student_card_is_unchanged_and_loads_from_anywhere(tmp_path, monkeypatch, digits):
    torch.manual_seed(0)
    student = models.build("resnet8", num_classes=10, in_channels=1).eval()
    card = model_card("resnet8", {}, digits, "kd", student=student)
    assert card["version"] == CARD_VERSION and "packages" not in card and "hf_config" not in card
    export_model(student, tmp_path / "zoo.safetensors", card)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    x = torch.randn(2, *DIGITS)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "zoo.safetensors")(x), student(x))


def test_an_hf_config_transformers_does_not_know_is_one_line(tmp_path, digits):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    student = models.build("hf:vit", num_classes=10, in_channels=1, input_size=DIGITS, **VIT).eval()
    card = model_card("hf:vit", VIT, digits, "kd", student=student)
    card["hf_config"]["model_type"] = "not_a_model_type"
    export_model(student, tmp_path / "hf.safetensors", card)
    with pytest.raises(CheckpointError) as caught:
        load_exported(tmp_path / "hf.safetensors")
    message = str(caught.value)
    assert f"transformers {transformers.__version__} has no model type 'not_a_model_type'" in message
    assert f"written with transformers {transformers.__version__}" in message
    assert short_line(message, tmp_path / "hf.safetensors")
