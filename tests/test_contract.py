"""One contract for every registered method: train -> checkpoint -> resume -> export -> reload -> same logits.

Each method trains a resnet8 on a small digits split from a seeded (untrained) resnet8 teacher: the mechanics
need its shapes, not its skill. A run cut after its first epoch and resumed must end bit-identical to the run
that was never cut, and the exported student, loaded into a fresh zoo model, must give the shipped student's
logits.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import teacher_changes, tiny_run
from distillab import methods, models
from distillab.cli import main
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint
from distillab.run import load_run_config, train_run

pytestmark = pytest.mark.slow

# two epochs (cut after the first), four constant-lr steps each
RUN = ("train.epochs=2", "train.batch_size=50", "train.schedule.name=constant")
DIGITS = {"num_classes": 10, "in_channels": 1}
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

    out = tmp_path / "exported.safetensors"
    assert main(["export", str(cut.run_dir), "--output", str(out)]) == 0
    exported, shipped = models.build("resnet8", **DIGITS).eval(), models.build("resnet8", **DIGITS).eval()
    exported.load_state_dict(load_file(str(out)))  # strict: the plain zoo architecture, nothing else
    shipped.load_state_dict(load_file(str(cut.run_dir / "student.safetensors")))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), shipped(x), rtol=1e-5, atol=1e-5)
