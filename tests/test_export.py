"""Deployable exports: safetensors with a model card, ONNX (checked under onnxruntime) and torch.export.

onnx/onnxruntime/onnxscript are an optional extra: the ONNX tests are skipped when they cannot be imported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import teacher_changes, tiny_config
from distillab import models
from distillab.cli import main
from distillab.errors import CheckpointError
from distillab.export import CARD_VERSION, export_model, load_exported, read_card

CARD = {"version": 1, "kwargs": {}, "num_classes": 10, "input_size": [3, 32, 32], "mean": [0.5] * 3,
        "std": [0.25] * 3, "method": "kd", "fused_bn": False}
# one model of every zoo family
FAMILIES = ["resnet8", "ResNet18", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "vit_tiny"]


def built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build(name, num_classes=10, in_channels=3).eval()
    with torch.no_grad():  # BN statistics away from their identity start, so that a wrong fold would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return session.run(["logits"], {"images": x.numpy()})[0]


def test_onnx_export_of_resnet8_matches_torch_at_any_batch_size_and_carries_its_card(tmp_path):
    pytest.importorskip("onnxscript")
    model, path = built("resnet8"), tmp_path / "student.onnx"
    export_model(model, path, {**CARD, "model": "resnet8"}, "onnx")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert np.abs(onnx_logits(path, x) - model(x).numpy()).max() < 1e-5
    assert read_card(path)["model"] == "resnet8" and read_card(path)["std"] == [0.25] * 3


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES[1:])
def test_onnx_export_matches_torch_for_every_zoo_family(tmp_path, name):
    pytest.importorskip("onnxscript")
    model, path = built(name), tmp_path / f"{name}.onnx"
    export_model(model, path, {**CARD, "model": name}, "onnx")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert np.abs(onnx_logits(path, x) - model(x).numpy()).max() < 1e-5


@pytest.mark.parametrize("name", ["resnet8", "vgg8"])
def test_torch_export_program_runs_any_batch_size(tmp_path, name):
    model, path = built(name), tmp_path / "student.pt2"
    export_model(model, path, {**CARD, "model": name}, "torch-export")
    program = torch.export.load(path).module()
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(program(x), model(x), atol=1e-5)
    assert read_card(path)["model"] == name


def test_safetensors_export_rebuilds_from_its_card_alone(tmp_path):
    model, path = built("wrn_16_1"), tmp_path / "student.safetensors"
    export_model(model, path, {**CARD, "model": "wrn_16_1"}, "safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_exported(path)(x), model(x))
    export_model(model, path, {**CARD, "model": "wrn_16_1", "fused_bn": True}, "safetensors")
    with pytest.raises(CheckpointError, match="export it as onnx or torch-export"):
        load_exported(path)


def test_a_card_of_a_newer_version_is_refused_and_an_empty_deploy_entry_is_the_student(tmp_path):
    model, path = built("resnet8"), tmp_path / "student.safetensors"
    export_model(model, path, {**CARD, "model": "resnet8", "version": CARD_VERSION, "deploy": {}}, "safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_exported(path)(x), model(x))
    export_model(model, path, {**CARD, "model": "resnet8", "version": CARD_VERSION + 1}, "safetensors")
    with pytest.raises(CheckpointError, match=f"reads versions up to {CARD_VERSION}"):
        load_exported(path)


def test_a_file_without_a_card_is_named(tmp_path):
    from distillab.engine.checkpoint import save_safetensors

    save_safetensors(built("resnet8"), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no distillab model card"):
        read_card(tmp_path / "plain.safetensors")


def test_cli_exports_a_finished_run_in_each_format(tmp_path, untrained_digits_teacher, capsys):
    config = tiny_config(tmp_path, "kd", "method.name=kd", *teacher_changes(untrained_digits_teacher, "resnet8"))
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "kd"
    formats = ["safetensors", "torch-export"]
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401

        formats.append("onnx")
    except ImportError:
        pass
    for fmt in formats:
        assert main(["export", str(run), "--format", fmt]) == 0
        assert f"({fmt})" in capsys.readouterr().out
    card = read_card(run / "exported_student.safetensors")
    assert card["input_size"] == [1, 8, 8] and card["num_classes"] == 10 and card["method"] == "kd"
    assert len(card["mean"]) == 1 and card["kwargs"] == {}
    assert card["version"] == CARD_VERSION and card["deploy"] == {}  # kd deploys the plain student
    student = load_exported(run / "exported_student.safetensors")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = student(x)
        assert torch.allclose(torch.export.load(run / "exported_student.pt2").module()(x), expected, atol=1e-5)
        if "onnx" in formats:
            assert np.abs(onnx_logits(run / "exported_student.onnx", x) - expected.numpy()).max() < 1e-5
