"""Methods compile without graph breaks (torch.compile, backend eager, on the CPU): each break is a host sync on a
GPU. The methods still known to break are marked xfail(strict): fixing one turns its test red until it is unmarked.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from distillab import methods, models
from distillab.methods.capabilities import needs_indices, wants_strong_view

KNOWN_BREAKS: dict[str, str] = {}  # method -> why it still breaks (none left)
pytestmark = pytest.mark.slow  # ~2.5 s per method on the 2-core CPU
OPTIONS = {"dfa": {"fd_weight": 1.0, "mode": "last"}, "crd": {"num_negatives": 16}}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BREAKS[n]))
                                  if n in KNOWN_BREAKS else n
                                  for n in methods.available() if n != "dfa_search"])
def test_the_training_forward_has_no_graph_break(name):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    teacher, student = models.build("resnet8", 10, 3).eval(), models.build("resnet8", 10, 3)
    method = methods.build(name, student, copy.deepcopy(teacher), input_shape=(3, 32, 32), **OPTIONS.get(name, {}))
    if needs_indices(method):
        method.bind_train_set(torch.randint(0, 10, (64,)))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    args = ([x, y] + ([torch.arange(8)] if needs_indices(method) else [])
            + ([x.flip(3)] if wants_strong_view(method) else []))
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = dynamo.explain(method)(*args)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("name", [n for n in methods.available() if n != "dfa_search"])
def test_the_training_forward_compiles_once_across_epochs(name):
    """Steps over three epochs (warm-up ramps change, RDR re-draws its order, CRD's bank and normaliser move)
    compile one graph: no recompile after the first step (torch._dynamo's own compile counter)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    teacher, student = models.build("resnet8", 10, 3).eval(), models.build("resnet8", 10, 3)
    method = methods.build(name, student, copy.deepcopy(teacher), input_shape=(3, 32, 32), **OPTIONS.get(name, {}))
    if needs_indices(method):
        method.bind_train_set(torch.randint(0, 10, (64,)))
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(method, backend=counter)
    compiles = []
    for epoch in range(3):
        method.set_progress(epoch, 3)
        for _ in range(2):
            x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
            args = ([x, y] + ([torch.randint(0, 64, (8,))] if needs_indices(method) else [])
                    + ([x.flip(3)] if wants_strong_view(method) else []))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step(*args)
            compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles[-1] == compiles[0], compiles


def test_a_compiled_run_drops_the_partial_batch():
    from distillab.config import AugmentConfig, SyntheticConfig, TrainConfig
    from distillab.data.splits import synthetic
    from distillab.engine.trainer import Trainer

    data = synthetic(SyntheticConfig(image_shape=(3, 8, 8), num_classes=4, train_size=70, test_size=8), 0)
    method = methods.build("ce", models.build("resnet8", 4, 3), input_shape=(3, 8, 8))
    for compiled, batches in ((False, 3), (True, 2)):
        cfg = TrainConfig(epochs=1, batch_size=32, device="cpu", compile=compiled, progress=False)
        trainer = Trainer(method, data, cfg, augment=AugmentConfig())
        assert len(list(trainer.loader)) == batches
