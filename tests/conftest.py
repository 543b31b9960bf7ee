import pytest
import torch

from distillab import models
from distillab.engine.checkpoint import save_safetensors


@pytest.fixture(autouse=True)
def _two_threads():
    """Keep each test on the machine's cores and make CPU runs repeatable."""
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def untrained_digits_teacher(tmp_path_factory) -> str:
    """A seeded, untrained resnet8 for 1x8x8 digits as a weights file: for tests of a method's mechanics, which
    need the teacher's shapes, not its skill."""
    path = tmp_path_factory.mktemp("untrained_teacher") / "teacher.safetensors"
    torch.manual_seed(5)
    save_safetensors(models.build("resnet8", num_classes=10, in_channels=1), path)
    return str(path)
