import pytest
import torch


@pytest.fixture(autouse=True)
def _two_threads():
    """Keep each test on the machine's cores and make CPU runs repeatable."""
    torch.set_num_threads(2)
    yield
