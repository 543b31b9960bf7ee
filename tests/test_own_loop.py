"""A method in the user's own training loop: the README's example runs as written, and a method called without an
input it needs says which, and how to give it, in one line (rather than a TypeError from inside its forward)."""

import re
from pathlib import Path

import pytest
import torch

from distillab import data, methods, models
from distillab.config import AugmentConfig
from distillab.engine.checkpoint import load_weights, save_safetensors
from distillab.errors import MissingInputError

ROOT = Path(__file__).resolve().parents[1]


def readme_block(first_line: str) -> str:
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no README block starts with {first_line!r}")


def test_the_readme_loop_trains_the_student_as_written(tmp_path, monkeypatch):
    torch.manual_seed(3)
    save_safetensors(models.build("resnet20", num_classes=10, in_channels=1), tmp_path / "teacher.safetensors")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(readme_block("# own_loop.py"), "own_loop.py", "exec"), scope)
    method, student, deployed = scope["method"], scope["student"], scope["deployed"]
    assert set(scope["terms"]) == {"ce", "kd"} and torch.isfinite(scope["loss"])
    assert method.epoch == 1 and deployed is student and not deployed.training
    assert all(not p.requires_grad for p in method.teacher.parameters())
    torch.manual_seed(0)  # the student's initial weights, as the example drew them
    untrained = models.build("resnet8", num_classes=10, in_channels=1)
    moved = [not torch.equal(a, b) for a, b in zip(student.parameters(), untrained.parameters(), strict=True)]
    assert all(moved)  # every parameter was trained
    teacher = models.build("resnet20", num_classes=10, in_channels=1)
    load_weights(teacher, tmp_path / "teacher.safetensors")
    assert torch.equal(teacher.state_dict()["head.fc.weight"], method.teacher.state_dict()["head.fc.weight"])


@pytest.fixture(scope="module")
def digits():
    return data.load_digits().train


def build(name: str, **options):
    torch.manual_seed(0)
    student = models.build("resnet8", num_classes=10, in_channels=1)
    teacher = models.build("resnet8", num_classes=10, in_channels=1)
    return methods.build(name, student, teacher, input_shape=(1, 8, 8), **options)


@pytest.mark.parametrize(("name", "options", "says"), [
    ("mlkd", {}, r"needs a strongly augmented view of each batch: call it as method\(images, labels, strong\)"),
    ("unikd", {"logit_loss": "mlkd"}, r"strongly augmented view .*\(logit_loss: mlkd\)"),
    ("crd", {"num_negatives": 8}, r"needs the training set's labels .* method\.bind_train_set\(train_labels\)"),
    ("dfa_search", {}, r"needs a batch from each of the two parts .* it is dfa's search stage"),
])
def test_a_missing_input_is_named_with_the_call_that_gives_it(name, options, says):
    method = build(name, **options)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(MissingInputError, match=says) as err:
        method(x, y)
    assert isinstance(err.value, TypeError)  # still what Python callers catch for a wrong call
    assert "\n" not in str(err.value) and "Trainer" in str(err.value)


def test_the_advice_works_crd_and_mlkd_with_the_device_loader(digits):
    """What the errors tell a user to do runs: DeviceLoader's batches give the inputs, in forward's order."""
    crd = build("crd", num_negatives=8)
    crd.bind_train_set(digits.labels)
    mlkd = build("mlkd")
    for method, extras in ((crd, {"with_indices": True}), (mlkd, {"strong_view": True})):
        loader = data.DeviceLoader(digits, 32, augment=AugmentConfig(crop_padding=1, flip=True), **extras)
        batch = next(iter(loader))
        method.train()
        logits, terms = method(*batch.method_args(indices=extras.get("with_indices", False)))
        assert logits.shape == (32, 10) and all(torch.isfinite(t) for t in terms.values())
        sum(terms.values()).backward()
        assert method.student.head.fc.weight.grad is not None
