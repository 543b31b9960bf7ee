"""Data layer: IDX/CIFAR readers on files written here, digits, splits, and the DeviceLoader."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import math
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distillab import data as dd
from distillab.config import AugmentConfig, DataConfig
from distillab.config_files import load_config
from distillab.data import cifar
from distillab.data.idx import read_idx_images, read_idx_labels, read_idx_pair
from distillab.data.loader import crop_flip
from distillab.errors import ConfigError, DataError, DistillabWarning

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
fashion_mnist = importlib.import_module("distillab.data.fashion_mnist")


# ---------------------------------------------------------------------------------------------- IDX


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def write(path: Path, raw: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    ip = write(tmp_path / "img", idx_bytes(0x803, images.shape, images.tobytes()), gz)
    lp = write(tmp_path / "lab", idx_bytes(0x801, labels.shape, labels.tobytes()), gz)
    got_images, got_labels = read_idx_pair(ip, lp)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_names_file(tmp_path, gz):
    raw = idx_bytes(0x803, (60000, 28, 28), bytes(1234))
    path = write(tmp_path / "train-images-idx3-ubyte.gz", raw, gz)
    with pytest.raises(DataError, match="truncated") as err:
        read_idx_images(path)
    assert str(path) in str(err.value)
    assert "60000 images of 28x28" in str(err.value) and "1234 bytes" in str(err.value)


def test_idx_bad_magic_and_wrong_kind(tmp_path):
    path = write(tmp_path / "bad-magic", idx_bytes(0x1234, (2,), b"\0\0"), gz=True)
    with pytest.raises(DataError, match="magic") as err:
        read_idx_labels(path)
    assert str(path) in str(err.value)
    labels = write(tmp_path / "labels", idx_bytes(0x801, (2,), b"\1\2"), gz=False)
    with pytest.raises(DataError, match="not an IDX images file"):
        read_idx_images(labels)


def test_idx_corrupt_gzip_and_count_mismatch(tmp_path):
    good = gzip.compress(idx_bytes(0x801, (100,), bytes(100)))
    path = tmp_path / "cut.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="gzip") as err:
        read_idx_labels(path)
    assert str(path) in str(err.value)
    ip = write(tmp_path / "img", idx_bytes(0x803, (3, 2, 2), bytes(12)), gz=False)
    lp = write(tmp_path / "lab", idx_bytes(0x801, (4,), bytes(4)), gz=False)
    with pytest.raises(DataError, match="4 labels"):
        read_idx_pair(ip, lp)


# ------------------------------------------------------------------------------------ Fashion-MNIST


def write_fashion(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.arange(n * 784, dtype=np.int64).reshape(n, 28, 28).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        for kind, magic, array in (("images-idx3", 0x803, images), ("labels-idx1", 0x801, labels)):
            raw = idx_bytes(magic, array.shape, array.tobytes())
            write(folder / f"{prefix}-{kind}-ubyte{suffix}", raw, gz)


@pytest.mark.parametrize("sub", ["", "fashion_mnist", "FashionMNIST/raw"])
def test_fashion_mnist_from_root(tmp_path, monkeypatch, sub):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    write_fashion(tmp_path / sub, gz=sub != "fashion_mnist")
    splits = dd.load_fashion_mnist(tmp_path, download=False)
    assert splits.train.images.shape == (6, 1, 28, 28) and splits.test.images.shape == (4, 1, 28, 28)
    assert splits.val is None and splits.num_classes == 10 and splits.train.labels.dtype == torch.int64


def test_fashion_mnist_missing_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        dd.load_fashion_mnist(tmp_path, download=False)
    assert str(tmp_path) in str(err.value) and "data.root" in str(err.value)
    monkeypatch.setattr(fashion_mnist, "BASE_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(DataError, match="download failed"):
        dd.load_fashion_mnist(tmp_path, download=True)
    assert not list(tmp_path.iterdir())  # no partial files left behind


def test_fashion_mnist_download(tmp_path, monkeypatch):
    server = tmp_path / "server"
    write_fashion(server)
    md5s = {stem: hashlib.md5((server / f"{stem}.gz").read_bytes()).hexdigest()
            for stem in fashion_mnist.FILES}
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    monkeypatch.setattr(fashion_mnist, "BASE_URL", server.as_uri() + "/")
    monkeypatch.setattr(fashion_mnist, "FILES", md5s)
    splits = dd.load_fashion_mnist(tmp_path / "root", download=True)
    assert len(splits.train) == 6 and (tmp_path / "root" / "t10k-labels-idx1-ubyte.gz").is_file()


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist package not installed")
def test_real_fashion_mnist():
    cfg = DataConfig(name="fashion_mnist", val_size=5000, train_subset=1000, test_subset=300)
    splits = dd.load_splits(cfg)
    assert splits.train.images.shape == (1000, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert len(splits.val) == 5000 and len(splits.test) == 300
    full = dd.load_fashion_mnist()
    assert full.train.images.shape == (60000, 1, 28, 28) and full.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(full.train.labels).tolist() == [6000] * 10
    assert torch.bincount(full.test.labels).tolist() == [1000] * 10
    x = full.train.images.double() / 255
    assert x.mean().item() == pytest.approx(full.train.mean[0], abs=1e-4)
    assert x.std().item() == pytest.approx(full.train.std[0], abs=1e-4)


# -------------------------------------------------------------------------------------------- CIFAR


def cifar_batch(n: int, seed: int, label_key: bytes, num_classes: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    batch = {b"batch_label": b"training batch", label_key: labels, b"data": flat,
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v // 5 for v in labels]
    return batch, flat


def write_cifar(root: Path, which: str, n: int = 4) -> dict[str, np.ndarray]:
    spec = cifar.SPECS[which]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    flats = {}
    for seed, (name, _) in enumerate(spec.train + spec.test):
        batch, flats[name] = cifar_batch(n, seed, spec.label_key.encode(), spec.num_classes)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return flats


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_reader_layout(tmp_path, which):
    flats = write_cifar(tmp_path, which)
    spec = cifar.SPECS[which]
    # the official files were pickled with numpy 1 (module numpy.core.multiarray): still readable
    path = tmp_path / spec.folder / spec.train[0][0]
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    splits = dd.load_cifar(tmp_path, which, download=False, verify_md5=False)
    n_train = 4 * len(spec.train)
    assert splits.train.images.shape == (n_train, 3, 32, 32) and splits.test.images.shape == (4, 3, 32, 32)
    assert splits.num_classes == spec.num_classes and splits.train.mean == spec.mean
    # pixel (channel c, row r, column k) of row i sits at flat[i, c*1024 + r*32 + k]
    first = flats[spec.train[0][0]]
    for i, c, r, k in [(0, 0, 0, 0), (1, 2, 31, 0), (2, 1, 5, 17), (3, 2, 31, 31)]:
        assert splits.train.images[i, c, r, k].item() == first[i, c * 1024 + r * 32 + k]
    test_flat = flats[spec.test[0][0]]
    assert torch.equal(splits.test.images.reshape(4, -1), torch.from_numpy(test_flat))
    assert splits.train.labels.dtype == torch.int64 and int(splits.train.labels.max()) < spec.num_classes


def test_cifar_truncated_and_corrupt(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        dd.load_cifar(tmp_path, "cifar10", download=False, verify_md5=False)
    assert str(path) in str(err.value)
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        dd.load_cifar(tmp_path, "cifar10", download=False, verify_md5=False)


def test_cifar_refuses_code_in_pickle(tmp_path):
    write_cifar(tmp_path, "cifar100")
    path = tmp_path / "cifar-100-python" / "test"

    class Payload:  # unpickling this would call os.getcwd(): harmless, but code all the same
        def __reduce__(self):
            return (os.getcwd, ())

    path.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(DataError, match="refusing"):
        dd.load_cifar(tmp_path, "cifar100", download=False, verify_md5=False)


def test_cifar_bad_shape_and_labels(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch, _ = cifar_batch(4, 0, b"labels", 10)
    batch[b"data"] = batch[b"data"][:, :1000]
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="3072"):
        dd.load_cifar(tmp_path, "cifar10", download=False, verify_md5=False)
    batch, _ = cifar_batch(4, 0, b"labels", 10)
    batch[b"labels"][2] = 10
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"0\.\.9"):
        dd.load_cifar(tmp_path, "cifar10", download=False, verify_md5=False)
    # a CIFAR-10 file where CIFAR-100 is expected: no fine_labels
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("train", "test"):
        (tmp_path / "cifar-100-python" / name).write_bytes(pickle.dumps(cifar_batch(2, 0, b"labels", 10)[0]))
    with pytest.raises(DataError, match="fine_labels"):
        dd.load_cifar(tmp_path, "cifar100", download=False, verify_md5=False)


def test_cifar_md5_mismatch(tmp_path):
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError, match="md5") as err:
        dd.load_cifar(tmp_path, "cifar10", download=False, verify_md5=True)
    message = str(err.value)
    assert "data_batch_1" in message and "c99cafc152244af753f735de768cd75f" in message


def test_cifar_md5_switch_from_the_config(tmp_path, capsys):
    """data.verify_md5: false reads a copy that is not the official release, and says so once."""
    write_cifar(tmp_path, "cifar10")
    cfg = DataConfig(name="cifar10", root=tmp_path, download=False)
    with pytest.raises(DataError, match=r"data\.verify_md5=false"):
        dd.load_splits(cfg)
    with pytest.warns(DistillabWarning, match="md5 check off") as caught:
        splits = dd.load_splits(cfg.model_copy(update={"verify_md5": False}))
    assert len(caught) == 1 and len(splits.train) > 0
    from distillab.cli import _show_warning  # the CLI prints it as one line
    _show_warning(caught[0].message, DistillabWarning, "x.py", 1)
    assert capsys.readouterr().err.startswith("distillab: warning: CIFAR-10 in ")


def test_cifar_missing_and_download(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="download is off"):
        dd.load_cifar(tmp_path / "empty", "cifar100", download=False)
    with pytest.raises(DataError, match=r"data\.root"):
        dd.load_cifar(None, "cifar10")
    # a tiny tarball laid out like the official one, served from a file:// URL
    src = tmp_path / "src"
    write_cifar(src, "cifar100", n=3)
    archive = tmp_path / "server" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    spec = dataclasses.replace(cifar.SPECS["cifar100"], url=archive.as_uri(),
                               archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(cifar.SPECS, "cifar100", spec)
    splits = dd.load_cifar(tmp_path / "root", "cifar100", download=True, verify_md5=False)
    assert len(splits.train) == 3 and (tmp_path / "root" / "cifar-100-python" / "train").is_file()
    # a corrupt archive in root is caught by its md5
    monkeypatch.setitem(cifar.SPECS, "cifar100", dataclasses.replace(spec, archive_md5="0" * 32))
    with pytest.raises(DataError, match="md5"):
        dd.load_cifar(tmp_path / "root2", "cifar100", download=True, verify_md5=False)


# ------------------------------------------------------------------------------------ digits, splits


def test_digits():
    splits = dd.load_digits()
    assert splits.train.images.shape == (1437, 1, 8, 8) and splits.test.images.shape == (360, 1, 8, 8)
    assert splits.val is None and splits.num_classes == 10
    assert int(splits.train.images.max()) == 255 and int(splits.train.images.min()) == 0
    x = splits.train.images.double() / 255
    assert x.mean().item() == pytest.approx(splits.train.mean[0], abs=1e-4)
    assert torch.equal(dd.load_digits().test.images, splits.test.images)  # fixed split
    counts = torch.bincount(splits.test.labels)
    assert counts.sum() == 360 and counts.min() >= 35 and counts.max() <= 37  # stratified


def test_load_splits_validation():
    cfg = DataConfig(name="digits", val_size=200, split_seed=3)
    a, b = dd.load_splits(cfg), dd.load_splits(cfg)
    assert len(a.val) == 200 and len(a.train) == 1237 and len(a.test) == 360
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    # disjoint and complete: hash each image row with its label against the full train set
    full = dd.load_digits().train
    key = lambda ds: {(bytes(ds.images[i].flatten().tolist()), int(ds.labels[i])) for i in range(len(ds))}  # noqa: E731
    n_unique = len(key(full))
    assert len(key(a.val) | key(a.train)) == n_unique and len(a.val) + len(a.train) == len(full)
    other = dd.load_splits(DataConfig(name="digits", val_size=200, split_seed=4))
    assert not torch.equal(other.val.labels, a.val.labels)
    assert a.val.name == "digits/val" and a.train.name == "digits/train"
    cfg = DataConfig(name="digits", val_size=200, split_seed=3, train_subset=100, test_subset=50)
    sub = dd.load_splits(cfg)
    assert len(sub.train) == 100 and len(sub.test) == 50 and torch.equal(sub.val.images, a.val.images)
    assert torch.equal(sub.test.images, a.test.images[:50])


@pytest.mark.parametrize(("kwargs", "field"), [({"val_size": 1437}, "data.val_size"),
                                               ({"val_size": 400, "train_subset": 1100}, "data.train_subset"),
                                               ({"test_subset": 361}, "data.test_subset")])
def test_load_splits_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        dd.load_splits(DataConfig(name="digits", **kwargs))


def test_a_registered_dataset_plugs_in_like_the_builtin_ones(monkeypatch):
    from distillab.data import registry

    assert {"digits", "fashion_mnist", "cifar10", "cifar100", "synthetic"} <= set(registry.available())
    with pytest.raises(ConfigError, match=r"data\.name: unknown dataset 'fashion_minst'; did you mean 'fashion_mnist'"):
        load_config(None, ["data.name=fashion_minst"], base={"student": {"name": "resnet8"}})
    monkeypatch.setattr(registry.DATASETS, "_entries", dict(registry.DATASETS._entries))  # the plug-in goes after
    registry.register("tiny")(lambda cfg: dd.DataSplits(indexed(40), None, indexed(12)))
    splits = dd.load_splits(DataConfig(name="tiny", val_size=10, train_subset=20, test_subset=5))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 10, 5)
    with pytest.raises(ValueError, match="dataset 'digits' is registered twice"):
        registry.register("digits")(lambda cfg: None)


# -------------------------------------------------------------------------------------------- loader


def indexed(n: int, hw: int = 4, channels: int = 1) -> dd.ImageDataset:
    """Image i is filled with the value i and labelled i, so batches reveal which images they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, channels, hw, hw).contiguous()
    return dd.ImageDataset(images, torch.arange(n), n, (0.0,) * channels, (1.0,) * channels, "indexed")


def epoch_labels(loader: dd.DeviceLoader, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return [y for _, y in loader]


def test_loader_covers_epoch_once():
    loader = dd.DeviceLoader(indexed(23), 5, seed=1)
    assert len(loader) == 5 and loader.num_samples == 23
    batches = [(x, y) for x, y in loader]
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(23)) and ys.tolist() != list(range(23))
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())  # images follow their labels


def test_loader_determinism():
    aug = AugmentConfig(crop_padding=2, flip=True)
    data = dd.load_digits().train
    a = dd.DeviceLoader(data, 64, seed=7, augment=aug)
    b = dd.DeviceLoader(data, 64, seed=7, augment=aug)
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # an epoch does not depend on what ran before it, and the global RNG is left alone
    epoch_labels(a, 0), epoch_labels(a, 1)
    fresh = dd.DeviceLoader(data, 64, seed=7, augment=aug)
    fresh.set_epoch(3)
    a.set_epoch(3)
    rng_state = torch.get_rng_state()
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, fresh, strict=True))
    assert torch.equal(rng_state, torch.get_rng_state())
    # augmentation changes from epoch to epoch even in a fixed order
    ordered = dd.DeviceLoader(data, 64, shuffle=False, augment=aug, seed=7)
    first = [x for x, _ in ordered]
    ordered.set_epoch(1)
    second = [x for x, _ in ordered]
    assert len(second) == len(first) and not all(map(torch.equal, first, second))
    assert not torch.equal(torch.cat(epoch_labels(a, 0)), torch.cat(epoch_labels(a, 1)))
    other_seed = dd.DeviceLoader(data, 64, seed=8, augment=aug)
    assert not torch.equal(torch.cat(epoch_labels(a, 0)), torch.cat(epoch_labels(other_seed, 0)))


def test_loader_resume_mid_epoch():
    loader = dd.DeviceLoader(dd.load_digits().train, 100, seed=2, augment=AugmentConfig(crop_padding=1))
    loader.set_epoch(5)
    full = list(loader)
    loader.set_epoch(5, start_batch=4)
    resumed = list(loader)
    assert len(resumed) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(list(loader)) == len(full)  # start_batch applies to one iteration only
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(loader) + 1)


def test_loader_eval_normalisation():
    splits = dd.load_digits()
    loader = dd.DeviceLoader(splits.test, 100, shuffle=False)
    x, y = next(iter(loader))
    mean, std = splits.test.mean[0], splits.test.std[0]
    expected = (splits.test.images[:100].float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, splits.test.labels[:100])
    assert torch.equal(torch.cat([y for _, y in loader]), splits.test.labels)


def test_crop_flip_bounds():
    p, b, h, w = 3, 64, 6, 7
    # every pixel of every image distinct and non-zero, so its origin can be read back
    images = torch.arange(1, b * h * w + 1).view(b, 1, h, w).expand(b, 2, h, w).contiguous()
    gen = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=gen)
    flips = torch.rand(b, generator=gen) < 0.5
    out = crop_flip(images, p, offsets, flips)
    assert out.shape == images.shape
    for i in range(b):
        src = out[i, 0]
        if flips[i]:
            src = src.flip(-1)  # undo the mirror: what remains must be a pure shift
        dy, dx = (offsets[i] - p).tolist()
        assert abs(dy) <= p and abs(dx) <= p
        for r in range(h):
            for k in range(w):
                r0, k0 = r + dy, k + dx
                inside = 0 <= r0 < h and 0 <= k0 < w
                assert src[r, k].item() == (images[i, 0, r0, k0].item() if inside else 0)
        assert torch.equal(out[i, 1], out[i, 0])  # channels move together
    assert torch.equal(crop_flip(images, 0, None, torch.ones(b, dtype=torch.bool)), images.flip(-1))
    assert torch.equal(crop_flip(images, 0, None, torch.zeros(b, dtype=torch.bool)), images)


def test_loader_augmentation_is_a_padded_shift_or_mirror():
    p = 2
    rng = torch.Generator().manual_seed(0)
    n, h = 40, 6
    images = torch.randint(1, 256, (n, 3, h, h), dtype=torch.uint8, generator=rng)
    ds = dd.ImageDataset(images, torch.arange(n), n, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "rand")
    loader = dd.DeviceLoader(ds, 16, augment=AugmentConfig(crop_padding=p, flip=True), seed=3)
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    seen, flipped = set(), 0
    for x, y in loader:
        assert x.shape == (len(y), 3, h, h)
        raw = ((x * std + mean) * 255).round()
        for img, label in zip(raw, y.tolist(), strict=True):
            crops = {(dy, dx, f): padded[label, :, dy:dy + h, dx:dx + h].float()
                     for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (False, True)}
            matches = [key for key, crop in crops.items()
                       if torch.equal(img, crop.flip(-1) if key[2] else crop)]
            assert matches, "output is not a crop of the padded source image"
            seen.add(matches[0][:2])
            flipped += matches[0][2]
    assert len(seen) > 5 and 5 < flipped < 35


def test_loader_sharding():
    n = 30
    shards = [dd.DeviceLoader(indexed(n), 4, seed=5, rank=r, world_size=2) for r in range(2)]
    ys = [torch.cat(epoch_labels(s, 2)) for s in shards]
    assert len(shards[0]) == len(shards[1]) == 4 and shards[0].num_samples == 15
    assert not set(ys[0].tolist()) & set(ys[1].tolist())
    assert sorted(ys[0].tolist() + ys[1].tolist()) == list(range(n))
    # odd size: padded by wrapping, so both ranks see 11 images and one image twice overall
    odd = [dd.DeviceLoader(indexed(21), 4, seed=5, rank=r, world_size=2) for r in range(2)]
    ys = [torch.cat(epoch_labels(s, 0)) for s in odd]
    assert len(ys[0]) == len(ys[1]) == 11 and set(ys[0].tolist()) | set(ys[1].tolist()) == set(range(21))
    # drop_last: the tail is cut, shards stay disjoint and equal
    dropped = [dd.DeviceLoader(indexed(21), 4, seed=5, rank=r, world_size=2, drop_last=True)
               for r in range(2)]
    ys = [torch.cat(epoch_labels(s, 0)) for s in dropped]
    assert len(ys[0]) == len(ys[1]) == 8 and not set(ys[0].tolist()) & set(ys[1].tolist())
    with pytest.raises(ValueError, match="rank"):
        dd.DeviceLoader(indexed(4), 2, rank=2, world_size=2)


def test_loader_drop_last_and_sizes():
    loader = dd.DeviceLoader(indexed(23), 5, drop_last=True)
    assert len(loader) == 4 and loader.num_samples == 20
    assert [len(y) for _, y in loader] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="batch_size=30 exceeds the 23 images"):
        dd.DeviceLoader(indexed(23), 30, drop_last=True)
    big = dd.DeviceLoader(indexed(23), 30)
    assert len(big) == 1 and [len(y) for _, y in big] == [23]
    with pytest.raises(ValueError, match="batch_size"):
        dd.DeviceLoader(indexed(23), 0)


def test_loader_channels_last():
    loader = dd.DeviceLoader(indexed(8, hw=5, channels=3), 4, channels_last=True,
                             augment=AugmentConfig(crop_padding=1))
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (4, 3, 5, 5)


def test_num_batches_formula():
    for n, bs in [(1, 1), (7, 3), (100, 7), (64, 64)]:
        assert len(dd.DeviceLoader(indexed(n), bs)) == math.ceil(n / bs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_same_batches_on_cuda():
    data = dd.load_digits().train
    aug = AugmentConfig(crop_padding=2, flip=True)
    cpu = dd.DeviceLoader(data, 128, seed=4, augment=aug)
    gpu = dd.DeviceLoader(data, 128, seed=4, augment=aug, device="cuda")
    assert gpu.images.is_cuda
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu())


def test_cifar100_protocol_constants_and_steps_per_epoch():
    from distillab.data.cifar import SPECS

    assert SPECS["cifar100"].mean == (0.5071, 0.4867, 0.4408)
    assert SPECS["cifar100"].std == (0.2675, 0.2565, 0.2761)
    n = 50_000
    images = torch.zeros(n, 1, 1, 1, dtype=torch.uint8)
    data = dd.ImageDataset(images, torch.zeros(n, dtype=torch.long), 100, (0.0,), (1.0,), "cifar-sized")
    assert len(dd.DeviceLoader(data, 64)) == 782  # last batch partial, as in the protocol
