"""One contract for every registered method: train -> checkpoint -> resume -> export -> reload -> same logits.

Each method trains a resnet8 on a small digits split from a seeded (untrained) resnet8 teacher: the mechanics
need its shapes, not its skill. A run cut after its first epoch and resumed must end bit-identical to the run
that was never cut, and the exported network, rebuilt from its model card alone, must give the logits of the
method's `deploy()` and of the run's shipped `student.safetensors`. Where the deployed network is the plain
student (no deploy entries in the card) the file also loads strictly into a stock zoo model; where it is more
(SimKD's projector and reused teacher classifier), it is exported in every format, each checked against
`deploy()`.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import teacher_changes, tiny_run
from distillab import methods, models
from distillab.cli import main
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from distillab.export import FORMATS, load_exported, read_card
from distillab.run import load_run_config, restore_method, train_run

pytestmark = pytest.mark.slow

# two epochs (cut after the first), four constant-lr steps each
RUN = ("train.epochs=2", "train.batch_size=50", "train.schedule.name=constant")
DIGITS = {"num_classes": 10, "in_channels": 1}
ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))  # the optional extra
# the few options a method needs to fit 200 tiny images; everything else keeps its defaults
OPTIONS = {
    "crd": ["method.options={num_negatives: 32, feat_dim: 16}"],
    "dfa": ["method.options={mode: last, fd_weight: 1.0}"],  # the search is dfa_search's own entry
    "dfa_search": ["method.options={epochs_per_group: 1}"],
}


class Interrupt(Exception):
    pass


def interrupt_after_first_epoch(epoch, record):
    if epoch == 1:
        raise Interrupt


def config(out, name: str, method: str, teacher: str):
    needs = methods.get(method).requires_teacher
    extra = teacher_changes(teacher, "resnet8") if needs else ()
    return tiny_run(out, name, *RUN, f"method.name={method}", *extra, *OPTIONS.get(method, []))


@pytest.mark.parametrize("method", sorted(methods.available()))
def test_every_method_keeps_the_contract(tmp_path, untrained_digits_teacher, method):
    teacher = untrained_digits_teacher
    full = config(tmp_path, "full", method, teacher)
    train_run(full)
    cut = config(tmp_path, "cut", method, teacher)
    with pytest.raises(Interrupt):
        train_run(cut, on_epoch_end=interrupt_after_first_epoch)
    train_run(load_run_config(cut.run_dir), resume=True)
    a, b = (load_checkpoint(c.run_dir / CHECKPOINT_FILE)["method"] for c in (full, cut))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # resumed = never interrupted, bit for bit

    _, _, restored, _ = restore_method(cut.run_dir)
    deployed = restored.deploy().eval()
    restored.close()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = deployed(x)

    out = tmp_path / "exported.safetensors"
    assert main(["export", str(cut.run_dir), "--output", str(out)]) == 0
    card = read_card(out)
    shipped = methods.get(method).rebuild_deployed(models.build("resnet8", **DIGITS), card["deploy"]).eval()
    shipped.load_state_dict(load_file(str(cut.run_dir / "student.safetensors")))  # strict
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shipped(x), expected, rtol=1e-5, atol=1e-5)
    if not card["deploy"]:
        stock = models.build("resnet8", **DIGITS).eval()
        stock.load_state_dict(load_file(str(out)))  # strict: the plain zoo architecture, nothing else
        with torch.no_grad():
            torch.testing.assert_close(stock(x), expected, rtol=1e-5, atol=1e-5)
        return
    for fmt in [f for f in FORMATS if f != "safetensors" and (f != "onnx" or ONNX)]:
        out = tmp_path / f"exported{FORMATS[fmt]}"
        assert main(["export", str(cut.run_dir), "--output", str(out), "--format", fmt]) == 0
        assert read_card(out) == card
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(np.asarray(session.run(["logits"], {"images": x.numpy()})[0]))
        else:
            with torch.no_grad():
                got = torch.export.load(out).module()(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
