"""The teacher cache: without augmentation the frozen teacher's outputs are computed once and looked up, and a run
trains exactly as with a teacher forward pass every step (bit for bit on the CPU)."""

import math

import pytest
import torch

from conftest import teacher_changes, tiny_settings
from distillab import methods
from distillab.config_files import load_config
from distillab.data.loader import DeviceLoader
from distillab.data.splits import load_splits
from distillab.engine.teacher_cache import VIEWS_DIR, build_teacher_cache, check_cache_size, output_bytes
from distillab.engine.trainer import Trainer
from distillab.errors import DistillabError
from distillab.run import build_method, train_run

CACHING = sorted(name for name, cls in methods.available().items() if cls.caches_teacher)
# no augmentation: a frozen teacher's outputs are the same every epoch, so they can be cached
RUN = ("data.augment.crop_padding=0", "seed=3")


@pytest.fixture(scope="module")
def teacher(digits_teacher) -> tuple[str, ...]:
    """The changes that make a run of this module distil from the session's trained digits teacher; a new tuple,
    so no module's settings change under another test."""
    return (*RUN, *teacher_changes(digits_teacher))


SMALL = {"crd": ["method.options.num_negatives=64"],  # options that fit 200 images
         "dfa": ["method.options.mode=last", "method.options.fd_weight=1"]}  # no search stage outside a run


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


def test_the_methods_that_run_the_teacher_only_on_the_batch_cache_it(teacher):
    assert {"kd", "fitnet", "at", "dkd", "dist", "crd", "reviewkd", "rdr", "diffkd", "kr", "simkd", "dfa",
            "unikd"} <= set(CACHING)
    assert not {"mlkd", "dfa_search", "ce"} & set(CACHING)  # a strong view, a search, no teacher
    _, _, variant_b = setup(teacher, "unikd", "method.options.logit_loss=mlkd")
    assert not variant_b.caches_teacher  # the teacher also runs on the strong view


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
    cache = build_teacher_cache(method.teacher, method.teacher_taps, lambda _: (b.images for b in loader), 1,
                                len(data.train), torch.no_grad)
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


def test_a_run_whose_cache_would_be_too_large_trains_with_the_teacher(teacher):
    trainer, a = trained(teacher, "kd", "train.teacher_cache_gib=0.000001")  # kd: 200 x 10 logits = 8 kB
    assert not trainer.teacher_cached and not trainer.loader.with_indices
    _, b = trained(teacher, "kd", "train.cache_teacher=false")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_size_is_computed_before_any_forward_and_over_the_limit_named(teacher):
    _, _, method = setup(teacher, "fitnet")
    per_image = output_bytes(method.teacher, method.teacher_taps, method.input_shape, None)
    [tap] = method.teacher_taps
    shape = method.shapes(method.teacher, tap.names)[tap.names[0]]
    assert per_image == {"logits": 10 * 4, tap.names[0]: math.prod(shape) * 4}
    assert output_bytes(method.teacher, method.teacher_taps, method.input_shape, torch.float16)["logits"] == 20
    total = sum(per_image.values()) * 200 * 8
    assert check_cache_size(per_image, 200, 8, total / 2**30) == total
    with pytest.raises(DistillabError, match=r"8 views x 200 images .* over train\.teacher_cache_gib=.*lower "
                                             r"train\.teacher_views"):
        check_cache_size(per_image, 200, 8, (total - 1) / 2**30)


@pytest.mark.parametrize("extra", [["data.augment.crop_padding=1"], ["data.augment.flip=true"],
                                   ["train.cache_teacher=false"]])
def test_augmentation_or_the_switch_turns_the_cache_off(teacher, extra):
    cfg, data, method = setup(teacher, "kd", "train.epochs=1", *extra)
    trainer = Trainer(method, data, cfg.train, seed=cfg.seed, augment=cfg.data.augment)
    assert not trainer.teacher_cached
    assert not trainer.loader.with_indices  # kd needs no positions when nothing is cached


# ------------------------------------------------------------------------------------- fixed views (teacher_views)
VIEWS = ("data.augment.crop_padding=2", "data.augment.flip=true", "train.teacher_views=3")


def test_a_loader_with_fixed_views_shows_each_image_in_one_of_its_views_every_epoch():
    from distillab.config import AugmentConfig
    from distillab.data.digits import load_digits

    data = load_digits()
    loader = DeviceLoader(data.train, 64, augment=AugmentConfig(crop_padding=2, flip=True), seed=5, views=3,
                          with_indices=True)
    views = [torch.cat(list(loader.view_batches(k, 50))) for k in range(3)]
    assert not torch.equal(views[0], views[1])
    seen = set()
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            expected = torch.stack(views)[batch.views, batch.indices]
            assert torch.equal(batch.images, expected)
            seen.update(batch.views.tolist())
    assert seen == {0, 1, 2}
    again = DeviceLoader(data.train, 64, augment=AugmentConfig(crop_padding=2, flip=True), seed=5, views=3)
    again.set_epoch(2, start_batch=3)
    loader.set_epoch(2)
    assert torch.equal(next(iter(again)).images, list(loader)[3].images)  # a resumed epoch: the same views


@pytest.mark.parametrize("name", CACHING)
def test_training_from_cached_views_equals_the_teacher_on_the_same_views_bit_for_bit(teacher, name):
    cached, a = trained(teacher, name, *VIEWS)
    fresh, b = trained(teacher, name, *VIEWS, "train.cache_teacher=false")
    assert cached.teacher_cached and not fresh.teacher_cached and cached.loader.views == 3
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert cached.history[-1]["loss"] == fresh.history[-1]["loss"]


def test_a_view_cached_run_resumes_mid_epoch_bit_for_bit_and_reuses_its_saved_views(teacher, tmp_path):
    import signal

    from distillab.engine.callbacks import Callback
    from distillab.engine.stopping import TrainingStopped

    class StopAtStep(Callback):  # as SIGTERM would: the loop stops after the step with a mid-epoch checkpoint
        def __init__(self):
            self.steps = 0

        def on_batch(self, trainer, batches):
            self.steps += 1
            if self.steps == 9:  # the second step of epoch 2 (7 steps an epoch)
                trainer.signals.signum = signal.SIGTERM

    def fit(run_dir, *callbacks, resume=False):
        cfg, data, method = setup(teacher, "fitnet", *VIEWS, "train.epochs=2", "train.batch_size=32")
        trainer = Trainer(method, data, cfg.train, seed=cfg.seed, augment=cfg.data.augment, run_dir=run_dir,
                          callbacks=callbacks)
        trainer.fit(resume=resume)
        return trainer, method.trainable_state_dict()

    _, reference = fit(tmp_path / "ref")
    with pytest.raises(TrainingStopped, match="at epoch 2, step 2:"):
        fit(tmp_path / "cut", StopAtStep())
    store = tmp_path / "cut" / VIEWS_DIR
    assert sorted(p.name for p in store.iterdir()) == [f"view_000{k}.safetensors" for k in range(3)]
    stamps = {p: p.stat().st_mtime_ns for p in store.iterdir()}
    trainer, resumed = fit(tmp_path / "cut", resume=True)
    assert trainer.teacher_cached and {p: p.stat().st_mtime_ns for p in stamps} == stamps  # read, not recomputed
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_views_without_augmentation_and_a_cache_over_the_limit_are_refused_before_any_work(teacher, tmp_path):
    from conftest import tiny_run
    from distillab.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_views=3 without augmentation"):
        tiny_run(tmp_path, "same", *teacher, "train.teacher_views=3")
    cfg = tiny_run(tmp_path, "big", *teacher, *VIEWS, "method.name=fitnet", "train.teacher_cache_gib=0.0001")
    with pytest.raises(DistillabError, match=r"over train\.teacher_cache_gib=0\.0001"):
        train_run(cfg)
    assert not (tmp_path / "runs" / "big" / "checkpoints").exists()


def test_a_half_precision_store_halves_the_cache_and_answers_in_float32_close_to_it(teacher):
    _, data, method = setup(teacher, "fitnet")
    loader = DeviceLoader(data.train, 128, shuffle=False)
    batches = lambda _: (b.images for b in loader)  # noqa: E731
    full = build_teacher_cache(method.teacher, method.teacher_taps, batches, 1, 200, torch.no_grad)
    half = build_teacher_cache(method.teacher, method.teacher_taps, batches, 1, 200, torch.no_grad,
                               dtype=torch.float16)
    assert half.nbytes * 2 == full.nbytes
    rows = torch.arange(200)
    a, b = full.answer(rows, []), half.answer(rows, [])
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
