"""The teacher cache: without augmentation the frozen teacher's outputs are computed once and looked up, and a run
trains exactly as with a teacher forward pass every step (bit for bit on the CPU)."""

import pytest
import torch

from conftest import teacher_changes, tiny_settings
from distillab import methods
from distillab.config_files import load_config
from distillab.data.loader import DeviceLoader
from distillab.data.splits import load_splits
from distillab.engine import callbacks
from distillab.engine.teacher_cache import build_teacher_cache
from distillab.engine.trainer import Trainer
from distillab.run import build_method

CACHING = sorted(name for name, cls in methods.available().items() if cls.caches_teacher)
# no augmentation: a frozen teacher's outputs are the same every epoch, so they can be cached
RUN = ("data.augment.crop_padding=0", "seed=3")


@pytest.fixture(scope="module")
def teacher(digits_teacher) -> tuple[str, ...]:
    """The changes that make a run of this module distil from the session's trained digits teacher; a new tuple,
    so no module's settings change under another test."""
    return (*RUN, *teacher_changes(digits_teacher))


SMALL = {"crd": ["method.options.num_negatives=64"]}  # options that fit 200 images


def setup(teacher: tuple[str, ...], method_name: str, *extra: str):
    cfg = load_config(None, base=tiny_settings(*teacher, f"method.name={method_name}", *SMALL.get(method_name, []),
                                               *extra))
    data = load_splits(cfg.data)
    torch.manual_seed(cfg.seed)
    method, _ = build_method(cfg, data)
    return cfg, data, method


def trained(teacher: tuple[str, ...], method_name: str, *extra: str) -> tuple[Trainer, dict[str, torch.Tensor]]:
    cfg, data, method = setup(teacher, method_name, *extra)
    trainer = Trainer(method, data, cfg.train, seed=cfg.seed, augment=cfg.data.augment)
    trainer.fit()
    return trainer, method.trainable_state_dict()


def test_the_methods_that_read_the_teacher_only_by_teacher_forward_cache_it():
    assert {"kd", "fitnet", "at", "dkd", "dist", "crd", "reviewkd", "rdr", "diffkd", "kr"} <= set(CACHING)
    assert not {"unikd", "mlkd", "dfa", "dfa_search", "ce"} & set(CACHING)  # other views, block outputs, none


@pytest.mark.parametrize(("name", "channels_last"), [*((n, True) for n in CACHING), ("fitnet", False), ("at", False)])
def test_a_cached_teacher_trains_bit_for_bit_like_the_forward_pass(teacher, name, channels_last):
    layout = f"train.channels_last={str(channels_last).lower()}"
    cached, a = trained(teacher, name, layout)
    fresh, b = trained(teacher, name, layout, "train.cache_teacher=false")
    assert cached.teacher_cached and not fresh.teacher_cached
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert cached.history[-1]["loss"] == fresh.history[-1]["loss"]


def test_the_cache_answers_what_the_teacher_computes_and_fills_its_taps(teacher):
    _, data, method = setup(teacher, "fitnet")
    loader = DeviceLoader(data.train, 128, shuffle=False, channels_last=True)
    method.to(memory_format=torch.channels_last)
    cache = build_teacher_cache(method.teacher, method.teacher_taps, loader, torch.no_grad, 2**30)
    [tap] = method.teacher_taps
    rows = torch.tensor([199, 0, 17, 17, 150])
    images = DeviceLoader(data.train.subset(rows), 5, shuffle=False, channels_last=True)
    x, _ = next(iter(images))
    with torch.no_grad():
        logits = method.teacher(x)
    [feature] = tap.take()
    assert torch.equal(cache.answer(rows, [tap]), logits)
    [cached] = tap.take()
    assert torch.equal(cached, feature)
    assert cached.is_contiguous(memory_format=torch.channels_last) == feature.is_contiguous(
        memory_format=torch.channels_last)
    assert len(cache) == 200 and cache.nbytes == sum(v.numel() * 4 for v in cache.outputs.values())


def test_a_run_whose_cache_would_be_too_large_trains_with_the_teacher(teacher, monkeypatch):
    monkeypatch.setattr(callbacks, "TEACHER_CACHE_MAX_BYTES", 1_000)  # kd: 200 x 10 logits = 8 kB
    trainer, a = trained(teacher, "kd")
    assert not trainer.teacher_cached and not trainer.loader.with_indices
    _, b = trained(teacher, "kd", "train.cache_teacher=false")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_over_its_memory_limit_is_not_built(teacher):
    _, data, method = setup(teacher, "fitnet")
    loader = DeviceLoader(data.train, 64, shuffle=False)
    assert build_teacher_cache(method.teacher, method.teacher_taps, loader, torch.no_grad, 10_000) is None
    shuffled = DeviceLoader(data.train, 64, shuffle=True)
    with pytest.raises(ValueError, match="dataset order"):
        build_teacher_cache(method.teacher, method.teacher_taps, shuffled, torch.no_grad, 2**30)


@pytest.mark.parametrize("extra", [["data.augment.crop_padding=1"], ["data.augment.flip=true"],
                                   ["train.cache_teacher=false"]])
def test_augmentation_or_the_switch_turns_the_cache_off(teacher, extra):
    cfg, data, method = setup(teacher, "kd", "train.epochs=1", *extra)
    trainer = Trainer(method, data, cfg.train, seed=cfg.seed, augment=cfg.data.augment)
    assert not trainer.teacher_cached
    assert not trainer.loader.with_indices  # kd needs no positions when nothing is cached
