"""Published teachers by name (`distillab teachers`, `published:NAME`), the shipped teachers as package data, and
the refusal of a teacher at chance. No network: releases are files in the exact published layout (a RepDistiller
checkpoint, mdistiller's tar), given with `--from` or served from a `file://` URL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import teacher_changes, tiny_config, tiny_run
from distillab import models, published
from distillab.cli import main
from distillab.config_files import load_config
from distillab.data import load_splits
from distillab.engine.checkpoint import load_weights, save_safetensors
from distillab.engine.trainer import TeacherAtChance, chance_threshold, check_above_chance
from distillab.errors import CheckpointError, ConfigError
from distillab.run import build_models, train_run
from test_peer_checkpoints import peer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50"}  # both releases' six teachers


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A cache of our own for every test: $DISTILLAB_HOME."""
    monkeypatch.setenv("DISTILLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distillab: error: "), err
    return err


def repdistiller_file(path: Path, arch: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A ckpt_epoch_240.pth as RepDistiller's train_teacher.py writes it, its accuracy a numpy scalar (as in the
    published files); returns the network's logits on a fixed batch."""
    expected, x = peer_checkpoint(arch, path, seed=seed)
    saved = torch.load(path, weights_only=False)
    saved["accuracy"] = np.float64(72.34)
    torch.save(saved, path)
    return expected, x


def mdistiller_tar(path: Path, archs: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """cifar_teachers.tar as mdistiller releases it: cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth; returns each
    member's logits, inputs and SHA-256."""
    out = {}
    with tarfile.open(path, "w") as tar:
        for seed, arch in enumerate(archs):
            member = path.parent / f"{arch}.pth"
            expected, x = repdistiller_file(member, arch, seed)
            tar.add(member, arcname=f"cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth")
            out[arch] = expected, x, hashlib.sha256(member.read_bytes()).hexdigest()
            member.unlink()
    return out


def served(monkeypatch, name: str, url: str, sha256: str | None = None) -> None:
    """Point the published teacher `name` at `url` (a file:// URL) with the recorded `sha256`."""
    entry = dataclasses.replace(published.TEACHERS[name], url=url, sha256=sha256)
    monkeypatch.setitem(published.TEACHERS, name, entry)


def logits_of(path: Path, arch: str, x: torch.Tensor) -> torch.Tensor:
    model = models.build(arch, num_classes=100)
    load_weights(model, path)
    with torch.no_grad():
        return model.eval()(x)


# -- the list ---------------------------------------------------------------------------------------------------
def test_the_list_holds_both_releases_six_teachers_and_ours(capsys):
    assert main(["teachers"]) == 0
    out = capsys.readouterr().out
    for name in ("cifar100_resnet32x4", "cifar100_vgg13_repdistiller", "fashion_mnist_resnet20",
                 "fashion_mnist_vit_conv"):
        assert name in out
    by_source = {}
    for t in published.TEACHERS.values():
        by_source.setdefault(t.source, set()).add(t.model)
        assert t.model in models.available()
        assert t.sha256 is None or len(t.sha256) == 64
    assert by_source["mdistiller"] == by_source["RepDistiller"] == ARCHS
    assert published.TEACHERS["cifar100_wrn_40_2"].url.endswith("/releases/download/checkpoints/cifar_teachers.tar")
    assert published.TEACHERS["cifar100_ResNet50_repdistiller"].url == (
        "http://shape2prog.csail.mit.edu/repo/ResNet50_vanilla/ckpt_epoch_240.pth")


# -- fetch ------------------------------------------------------------------------------------------------------
def test_fetch_converts_a_repdistiller_checkpoint_given_by_hand(tmp_path, home, capsys):
    source = tmp_path / "ckpt_epoch_240.pth"
    expected, x = repdistiller_file(source, "resnet56")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert main(["teachers", "fetch", "cifar100_resnet56_repdistiller", "--from", str(source)]) == 0
    out = capsys.readouterr().out
    converted = home / "teachers" / "cifar100_resnet56_repdistiller.safetensors"
    assert f"SHA-256 {digest}: not verified" in out and str(converted) in out
    assert "checkpoint: published:cifar100_resnet56_repdistiller" in out
    assert torch.allclose(logits_of(converted, "resnet56", x), expected, rtol=1e-5, atol=1e-5)
    with safe_open(str(converted), "pt") as f:
        meta = f.metadata()
    assert meta["published"] == "cifar100_resnet56_repdistiller" and meta["source_sha256"] == digest
    assert meta["sha256_verified"] == "false"
    assert not list((home / "teachers").glob(".*"))  # no temporary file left

    # a SHA-256 the user gives is checked: a different one is refused, the file already there is kept
    before = converted.read_bytes()
    assert main(["teachers", "fetch", "cifar100_resnet56_repdistiller", "--from", str(source),
                 "--sha256", "0" * 64]) == 2
    assert f"is {digest}, not the --sha256 given" in one_line_error(capsys)
    assert converted.read_bytes() == before
    assert main(["teachers", "fetch", "cifar100_resnet56_repdistiller", "--from", str(source),
                 "--sha256", digest]) == 0
    assert f"SHA-256 {digest}: checked" in capsys.readouterr().out


def test_fetch_downloads_mdistillers_tar_once_and_takes_out_each_teacher(tmp_path, home, monkeypatch, capsys):
    tar = tmp_path / "release" / "cifar_teachers.tar"
    tar.parent.mkdir()
    members = mdistiller_tar(tar, ["resnet56", "resnet110"])
    served(monkeypatch, "cifar100_resnet56", tar.as_uri(), sha256=members["resnet56"][2])
    served(monkeypatch, "cifar100_resnet110", tar.as_uri())
    assert main(["teachers", "fetch", "cifar100_resnet56"]) == 0
    assert f"SHA-256 {members['resnet56'][2]}: checked" in capsys.readouterr().out
    expected, x, _ = members["resnet56"]
    assert torch.allclose(logits_of(home / "teachers" / "cifar100_resnet56.safetensors", "resnet56", x), expected,
                          rtol=1e-5, atol=1e-5)
    assert (home / "teachers" / "downloads" / "cifar_teachers.tar").read_bytes() == tar.read_bytes()

    tar.unlink()  # the second teacher of the release comes from the tar already downloaded
    assert main(["teachers", "fetch", "cifar100_resnet110"]) == 0
    assert "not verified" in capsys.readouterr().out
    expected, x, _ = members["resnet110"]
    assert torch.allclose(logits_of(home / "teachers" / "cifar100_resnet110.safetensors", "resnet110", x), expected,
                          rtol=1e-5, atol=1e-5)
    assert main(["teachers", "fetch", "cifar100_resnet110"]) == 0  # fetched before: nothing to do
    assert "was fetched before" in capsys.readouterr().out


def test_a_tar_without_the_teacher_or_a_wrong_checksum_is_refused(tmp_path, home, monkeypatch, capsys):
    tar = tmp_path / "cifar_teachers.tar"
    members = mdistiller_tar(tar, ["resnet56"])
    assert main(["teachers", "fetch", "cifar100_vgg13", "--from", str(tar)]) == 2
    assert "holds no file vgg13_vanilla/ckpt_epoch_240.pth" in one_line_error(capsys)
    served(monkeypatch, "cifar100_resnet56", tar.as_uri(), sha256="1" * 64)
    assert main(["teachers", "fetch", "cifar100_resnet56"]) == 2
    err = one_line_error(capsys)
    assert f"is {members['resnet56'][2]}, not the recorded one" in err and "delete " in err
    assert not (home / "teachers" / "cifar100_resnet56.safetensors").exists()


def test_a_network_failure_names_the_url_and_how_to_place_the_file_by_hand(tmp_path, home, monkeypatch, capsys):
    url = (tmp_path / "offline" / "cifar_teachers.tar").as_uri()
    served(monkeypatch, "cifar100_resnet32x4", url)
    assert main(["teachers", "fetch", "cifar100_resnet32x4"]) == 2
    err = one_line_error(capsys)
    assert url in err and "distillab teachers fetch cifar100_resnet32x4 --from FILE" in err
    assert not (home / "teachers" / "downloads" / "cifar_teachers.tar").exists()
    assert not list((home / "teachers" / "downloads").glob("*.part"))
    assert main(["teachers", "fetch", "cifar100_resnet32x5"]) == 2
    assert "did you mean 'cifar100_resnet32x4'" in one_line_error(capsys)


# -- configs ----------------------------------------------------------------------------------------------------
def test_a_config_names_a_published_teacher_checked_with_the_config(tmp_path):
    def teacher(name, checkpoint):
        return load_config(None, base={"teacher": {"name": name, "checkpoint": checkpoint},
                                       "student": {"name": "resnet8"}, "method": {"name": "kd"}})

    assert str(teacher("resnet32x4", "published:cifar100_resnet32x4").teacher.checkpoint) == (
        "published:cifar100_resnet32x4")
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint: unknown published teacher 'cifar100_resnet23x4'; "
                                          r"did you mean 'cifar100_resnet32x4'\?"):
        teacher("resnet32x4", "published:cifar100_resnet23x4")
    with pytest.raises(ConfigError, match=r"published:cifar100_resnet32x4 is a resnet32x4, but teacher\.name is "
                                          r"'resnet8x4': set teacher\.name: resnet32x4"):
        teacher("resnet8x4", "published:cifar100_resnet32x4")
    with pytest.raises(ConfigError, match=r"did you mean 'published:cifar100_vgg13'"):
        teacher("vgg13", "publshed:cifar100_vgg13")
    with pytest.raises(ConfigError, match=r"teacher\.kwargs: published:fashion_mnist_vit_conv is a vit_tiny built "
                                          "with kwargs"):
        teacher("vit_tiny", "published:fashion_mnist_vit_conv")
    cfg = tiny_run(tmp_path, "kd", "method.name=kd", *teacher_changes("published:cifar100_resnet56", "resnet56"))
    with pytest.raises(CheckpointError, match=r"published:cifar100_resnet56 has not been fetched yet: run "
                                              r"`distillab teachers fetch cifar100_resnet56`"):
        train_run(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_fetched_teacher_trains_a_student_by_its_published_name(tmp_path, capsys):
    source = tmp_path / "ckpt_epoch_240.pth"
    repdistiller_file(source, "resnet56")
    assert main(["teachers", "fetch", "cifar100_resnet56_repdistiller", "--from", str(source)]) == 0
    config = tmp_path / "kd.yaml"  # random labels: no teacher beats chance on them, so none is asked to
    config.write_text(f"output_dir: {tmp_path / 'runs'}\nname: kd\n"
                      "data: {name: synthetic, synthetic: {num_classes: 100, train_size: 64, test_size: 32}}\n"
                      "teacher: {name: resnet56, checkpoint: published:cifar100_resnet56_repdistiller}\n"
                      "student: {name: resnet8}\nmethod: {name: kd}\ntrain: {epochs: 1, batch_size: 32, "
                      "progress: false}\n")
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "runs" / "kd" / "summary.json").read_text())
    converted = published.TEACHERS["cifar100_resnet56_repdistiller"].path()
    assert summary["teacher_sha256"] == hashlib.sha256(converted.read_bytes()).hexdigest()


# -- the shipped teachers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fashion_mnist_resnet20", "fashion_mnist_vit_conv"])
def test_the_shipped_teachers_resolve_outside_a_clone(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)  # no teachers/ here: the package's own
    entry = published.TEACHERS[name]
    budget = load_config(Path("configs/fashion_mnist/kd.yaml"), layers=[Path(entry.budget)])
    by_path = published.resolve(budget.teacher.checkpoint)
    assert by_path == published.resolve(Path(f"published:{name}")) == published.PACKAGED_TEACHERS / name
    teacher = models.build(entry.model, num_classes=10, in_channels=1, **entry.kwargs)
    assert load_weights(teacher, by_path) == budget.teacher.sha256 == entry.sha256
    assert main(["teachers", "fetch", name]) == 0
    assert str(by_path) in capsys.readouterr().out


def test_the_shipped_teachers_are_package_data_and_the_repository_paths_still_work():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["distillab"]
    package = ROOT / "src" / "distillab"
    shipped = {p.relative_to(package).as_posix() for pattern in patterns for p in package.glob(pattern)}
    for name in ("fashion_mnist_resnet20", "fashion_mnist_vit_conv"):
        assert {f"teachers/{name}/{f}" for f in ("student.safetensors", "config.yaml", "summary.json")} <= shipped
        assert (ROOT / "teachers" / name / "student.safetensors").resolve() == (
            package / "teachers" / name / "student.safetensors")  # the repository's teachers/ paths still work
    assert not any("in_progress" in path for path in shipped)  # unfinished teachers stay in the repository


def test_a_missing_teacher_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the shipped configs' teachers are missing
    assert main(["train", "configs/fashion_mnist/kd.yaml"]) == 2
    err = one_line_error(capsys)
    assert "runs/fashion_mnist/teacher_resnet20: weights file not found" in err
    assert "`distillab train configs/fashion_mnist/teacher_resnet20.yaml`" in err
    assert "--budget configs/fashion_mnist/_converged.yaml" in err
    assert main(["train", "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"]) == 2  # before any data is downloaded
    err = one_line_error(capsys)
    assert "`distillab train configs/cifar100/teachers/resnet32x4.yaml`" in err
    assert "`distillab teachers fetch cifar100_resnet32x4`" in err and "published:cifar100_resnet32x4" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


# -- a teacher at chance ----------------------------------------------------------------------------------------
def test_chance_is_three_binomial_standard_errors_above_one_in_c():
    assert chance_threshold(10, 100) == pytest.approx(10 + 3 * 100 * (0.1 * 0.9 / 100) ** 0.5)  # 19 %
    assert chance_threshold(100, 10_000) == pytest.approx(1 + 3 * 100 * (0.01 * 0.99 / 10_000) ** 0.5)
    check_above_chance(19.01, 100, 10, "val")
    with pytest.raises(TeacherAtChance, match=r"19\.00 % on the 100 val images, which is at chance: not above "
                                              r"100/10 = 10\.00 % by 3 binomial standard errors"):
        check_above_chance(19.0, 100, 10, "val")


@pytest.mark.parametrize(("val_size", "split", "images"), [(100, "val", 100), (0, "test", 360)])
def test_a_teacher_at_chance_is_refused_before_anything_is_written(tmp_path, capsys, val_size, split, images):
    torch.manual_seed(5)
    untrained = tmp_path / "untrained.safetensors"
    save_safetensors(models.build("resnet8", num_classes=10, in_channels=1), untrained)
    config = tiny_config(tmp_path, "kd", "method.name=kd", f"data.val_size={val_size}",
                         *teacher_changes(untrained, "resnet8"))
    assert main(["train", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"teacher resnet8 ({untrained}) scores" in err and f"on the {images} {split} images" in err
    assert "binomial standard errors" in err
    assert not (tmp_path / "runs").exists()


def test_a_teacher_above_chance_is_measured_on_both_splits(tmp_path, untrained_digits_teacher):
    cfg = tiny_run(tmp_path, "kd", "method.name=kd", *teacher_changes(untrained_digits_teacher, "resnet8"))
    summary = train_run(cfg)
    assert summary["teacher_val_acc"] > chance_threshold(10, 100) and summary["teacher_test_acc"] > 19.0
    data = load_splits(cfg.data)
    teacher, _, info = build_models(cfg, data)
    assert info["teacher_sha256"] == summary["teacher_sha256"] and teacher is not None
