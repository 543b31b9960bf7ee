"""Weights of Hugging Face models: a teacher's load exactly or are refused by name; a student's mismatched
tensors are re-initialised with a warning naming them.

transformers is an optional test extra: these tests are skipped when it cannot be imported.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import tiny_config, tiny_run
from distillab import models
from distillab.cli import main
from distillab.data import load_splits
from distillab.engine.checkpoint import save_safetensors
from distillab.errors import CheckpointError
from distillab.models.outside import ReinitialisedWeights
from distillab.run import build_models

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

DIGITS = (1, 8, 8)  # the tiny run's data: 10 classes
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4)
RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")


def save_hf(directory, kind: str = "vit", num_classes: int = 10, in_channels: int = 1) -> dict[str, torch.Tensor]:
    """A small transformers classifier for `num_classes` and `in_channels` saved with `save_pretrained`; returns
    the tensors it saved (in transformers' key layout)."""
    torch.manual_seed(3)
    fields = {"vit": VIT, "resnet": RESNET}[kind]
    built = models.build(f"hf:{kind}", num_classes=num_classes, in_channels=in_channels,
                         input_size=(in_channels, *DIGITS[1:]), **fields)
    with torch.no_grad():  # BN statistics away from their init, so that a buffer left unloaded would show
        for buffer in built.model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    built.model.save_pretrained(directory)
    return {k: v.clone() for k, v in built.model.state_dict().items()}


def build(directory, exact: bool):
    return models.build(f"hf:{directory}", num_classes=10, in_channels=DIGITS[0], input_size=DIGITS,
                        exact_weights=exact)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_a_teacher_whose_head_does_not_fit_the_data_is_refused_naming_the_tensors(tmp_path, kind):
    save_hf(tmp_path / "t", kind, num_classes=7)
    width = {"vit": 32, "resnet": 16}[kind]
    with pytest.raises(CheckpointError) as caught:
        build(tmp_path / "t", exact=True)
    message = str(caught.value)
    assert f"'classifier.{'1.' if kind == 'resnet' else ''}weight' saved (7, {width}), expected (10, {width})" \
        in message
    assert "bias' saved (7,), expected (10,)" in message
    assert "saved for 7 classes, where the data has 10" in message and "trained on this data's classes" in message
    assert "\n" not in message


def test_a_teacher_saved_for_other_input_channels_is_refused_naming_its_stem(tmp_path):
    save_hf(tmp_path / "rgb", in_channels=3)
    with pytest.raises(CheckpointError, match=r"'vit\.embeddings\.patch_embeddings\.projection\.weight' saved "
                                              r"\(32, 3, 4, 4\), expected \(32, 1, 4, 4\).*saved for 3 channels"):
        build(tmp_path / "rgb", exact=True)


def test_a_teacher_with_missing_or_unexpected_tensors_is_refused_naming_them(tmp_path):
    saved = save_hf(tmp_path / "t")
    file = tmp_path / "t" / "model.safetensors"
    state = safetensors_torch.load_file(str(file))
    state.pop("vit.layernorm.weight")
    state["vit.extra.weight"] = torch.zeros(3)
    safetensors_torch.save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as caught:
        build(tmp_path / "t", exact=True)
    assert "missing from the file: 'vit.layernorm.weight'" in str(caught.value)
    assert "not in the model: 'vit.extra.weight'" in str(caught.value)
    with pytest.warns(ReinitialisedWeights, match="missing from the file: 'vit.layernorm.weight'"):
        student = build(tmp_path / "t", exact=False)
    assert torch.equal(student.model.vit.layernorm.bias, saved["vit.layernorm.bias"])


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_a_student_re_initialises_a_mismatched_head_with_a_warning_and_keeps_the_rest(tmp_path, kind):
    saved = save_hf(tmp_path / "s", kind, num_classes=7)
    with pytest.warns(ReinitialisedWeights, match=r"2 saved tensor\(s\) re-initialised.*'classifier\."):
        student = build(tmp_path / "s", exact=False)
    loaded = student.model.state_dict()
    head = {k for k in saved if k.startswith("classifier.")}
    assert head and all(loaded[k].shape[0] == 10 for k in head if loaded[k].dim())
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k not in head)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_a_teacher_that_fits_loads_bit_exactly_and_without_a_warning(tmp_path, kind):
    saved = save_hf(tmp_path / "t", kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReinitialisedWeights)
        teacher = build(tmp_path / "t", exact=True)
    loaded = teacher.model.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_the_cli_refuses_a_mismatched_hf_teacher_in_one_line(tmp_path, capsys):
    save_hf(tmp_path / "t", num_classes=7)
    config = tiny_config(tmp_path, "kd_hf", f"teacher.name='hf:{tmp_path / 't'}'", "method.name=kd")
    assert main(["train", str(config)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distillab:")]
    assert len(lines) == 1 and lines[0].startswith("distillab: error: teacher hf:")
    assert "'classifier.weight' saved (7, 32)" in lines[0]
    assert not (tmp_path / "runs" / "kd_hf" / "checkpoints").exists()


def test_an_hf_model_type_teacher_with_a_checkpoint_loads_exactly_or_is_refused(tmp_path):
    """`hf:<model_type>` with `checkpoint:` a weights file as distillab writes it (a run's student.safetensors)."""
    fields = "teacher.kwargs={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, " \
             "intermediate_size: 64, patch_size: 4}"
    files = {}
    for classes in (10, 7):
        torch.manual_seed(classes)
        files[classes] = tmp_path / f"vit{classes}.safetensors"
        save_safetensors(models.build("hf:vit", num_classes=classes, in_channels=1, input_size=DIGITS, **VIT),
                         files[classes])
    cfg = tiny_run(tmp_path, "ok", "teacher.name='hf:vit'", fields, f"teacher.checkpoint={files[10]}",
                   "method.name=kd")
    data = load_splits(cfg.data)
    teacher, _, _ = build_models(cfg, data)
    saved = safetensors_torch.load_file(str(files[10]))
    loaded = teacher.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    cfg = tiny_run(tmp_path, "bad", "teacher.name='hf:vit'", fields, f"teacher.checkpoint={files[7]}",
                   "method.name=kd")
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'model\.classifier\.weight': file has \(7, 32\), "
                                              r"model expects \(10, 32\); also 'model\.classifier\.bias'"):
        build_models(cfg, data)
    save_hf(tmp_path / "hf_dir")  # transformers' own file renames keys as it loads: it is named, not misread
    cfg = tiny_run(tmp_path, "hf_file", "teacher.name='hf:vit'", fields,
                   f"teacher.checkpoint={tmp_path / 'hf_dir' / 'model.safetensors'}", "method.name=kd")
    with pytest.raises(CheckpointError, match=r"loads as the model name hf:<directory>"):
        build_models(cfg, data)
