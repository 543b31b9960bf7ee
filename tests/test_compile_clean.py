"""Methods compile without graph breaks (torch.compile, backend eager, on the CPU): each break is a host sync on a
GPU. The methods still known to break are marked xfail(strict): fixing one turns its test red until it is unmarked.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from distillab import methods, models

KNOWN_BREAKS = {  # method -> why it still breaks (issue: compile-clean methods)
    "crd": "data-dependent branches: the memory's normaliser set on the first batch, `short.any()` when sampling",
    "rdr": "the branch order is a Python permutation (torch.randperm(K).tolist())",
}
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
    if method.needs_indices:
        method.bind_train_set(torch.randint(0, 10, (64,)))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    args = [x, y] + ([torch.arange(8)] if method.needs_indices else []) + ([x.flip(3)] if method.extra_views else [])
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = dynamo.explain(method)(*args)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
