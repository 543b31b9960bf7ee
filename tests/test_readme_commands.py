"""Every command in the README's shell blocks runs, in the README's order, in a fresh directory outside the clone (as
a wheel user has it: shipped configs and teachers found through the package; `suites/` copied in, as only a clone
has them), on tiny overrides. `PLAN` says, per command, what is added to it (a tiny budget, or the stand-in for a
download) and what is staged first; a README command without a plan entry fails the first test, so the README cannot
gain a command that nothing runs. `-s` prints each command with its exit code and time."""

from __future__ import annotations

import dataclasses
import glob
import os
import pickle
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import shrink_demo
from distillab import models, published
from distillab.cli import main
from distillab.data import cifar
from test_peer_checkpoints import LAYOUTS

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

TINY_FASHION = ["--set", "train.epochs=1", "--set", "data.train_subset=512", "--set", "data.val_size=500",
                "--set", "data.test_subset=500", "--set", "train.progress=false"]
TINY_CIFAR = ["--set", "data.root=~/data/cifar", "--set", "data.verify_md5=false", "--set", "train.epochs=1",
              "--set", "train.batch_size=8", "--set", "train.schedule.milestones=[1]", "--set", "train.progress=false"]
KD_RUN = "runs/fashion_mnist/kd_resnet8_fashion_mnist_s1"
CIFAR_CONFIG = "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, in order: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if command:
                commands.append(" ".join(command.split()))
    return commands


# -- staging: what a user would have downloaded or made before the command -------------------------------------
def fake_cifar100(root: Path, images: int = 8) -> None:
    """CIFAR-100 in the official python-pickle layout, tiny; every label 0, so that a teacher that answers 0
    is far above chance (the run refuses a teacher at chance) without training one here."""
    spec = cifar.SPECS["cifar100"]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, _ in spec.train + spec.test:
        batch = {b"batch_label": b"batch", b"fine_labels": [0] * images, b"coarse_labels": [0] * images,
                 b"data": rng.integers(0, 256, (images, 3072), dtype=np.uint8),
                 b"filenames": [b"img_%d.png" % i for i in range(images)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def peer_file(path: Path, arch: str) -> None:
    """A ckpt_epoch_240.pth as RepDistiller and mdistiller publish it, of a network that always answers class 0."""
    torch.manual_seed(0)
    model = models.build(arch, num_classes=100)
    with torch.no_grad():
        model.head.fc.bias.zero_()[0] = 1e4
    state = dict(zip(LAYOUTS[arch](model), model.state_dict().values(), strict=True))
    torch.save({"epoch": 240, "model": state, "accuracy": 70.0, "optimizer": None}, path)


def serve_mdistiller_tar(work: Path, monkeypatch) -> None:
    """mdistiller's cifar_teachers.tar with resnet32x4 in it, served from a file:// URL in place of GitHub's."""
    member = work / "served" / "resnet32x4.pth"
    member.parent.mkdir(exist_ok=True)
    peer_file(member, "resnet32x4")
    tar_path = member.parent / "cifar_teachers.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(member, arcname="cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")
    for name in [n for n, t in published.TEACHERS.items() if t.source == "mdistiller"]:
        entry = dataclasses.replace(published.TEACHERS[name], url=tar_path.as_uri(), sha256=None)
        monkeypatch.setitem(published.TEACHERS, name, entry)


def tiny_converged_budget(work: Path) -> None:
    """configs/fashion_mnist/_converged.yaml in the working directory (it comes before the shipped one), shrunk:
    what the leaderboard suite lays over every run, so its commands train tiny runs."""
    from distillab.config_files import PACKAGED_CONFIGS

    budget = yaml.safe_load((PACKAGED_CONFIGS / "fashion_mnist" / "_converged.yaml").read_text())
    budget["data"].update(train_subset=256, val_size=500, test_subset=500)
    budget["train"].update(epochs=1, eval_every=1, progress=False)
    target = work / "configs" / "fashion_mnist" / "_converged.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(budget))


@dataclasses.dataclass
class Step:
    """How the test runs one README command: `add` goes after it; `setup(work, monkeypatch)` runs first;
    `argv(words)` rewrites it where a tiny stand-in replaces part of it (GPU counts, another machine)."""

    add: list[str] = dataclasses.field(default_factory=list)
    setup: Callable | None = None
    argv: Callable[[list[str]], list[str]] | None = None
    skip: str | None = None  # why the test does not run it (it is CI itself)


def local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PLAN: dict[str, Step] = {
    "make demo": Step(skip="`make` installs the project, then runs `distillab demo` (run below); CI runs `make test`"),
    "make test": Step(skip="CI runs it: this test is part of it"),
    "distillab train configs/fashion_mnist/teacher_resnet20.yaml": Step(  # enough steps to be above chance
        [*TINY_FASHION, "--set", "train.epochs=2", "--set", "train.batch_size=32"]),
    "distillab train configs/fashion_mnist/kd.yaml --set seed=1 --set train.optim.lr=0.05": Step(TINY_FASHION),
    f"distillab train --resume {KD_RUN}": Step(["--set", "train.epochs=2"]),
    "distillab train configs/fashion_mnist/kd.yaml --budget configs/fashion_mnist/_converged.yaml": Step(TINY_FASHION),
    "distillab teachers fetch cifar100_resnet32x4": Step(setup=lambda work, mp: serve_mdistiller_tar(work, mp)),
    f"distillab train {CIFAR_CONFIG} --set data.root=~/data/cifar": Step(
        TINY_CIFAR, setup=lambda work, mp: fake_cifar100(work / "home" / "data" / "cifar")),
    "distillab train configs/fashion_mnist/dfa.yaml": Step(
        [*TINY_FASHION, "--set", "method.options.search.epochs_per_group=1"]),
    "distillab eval runs/<run>": Step(),
    "distillab convert ckpt_epoch_240.pth resnet32x4.safetensors --model resnet32x4": Step(
        setup=lambda work, mp: peer_file(work / "ckpt_epoch_240.pth", "resnet32x4")),
    "distillab export runs/<run> --output student.safetensors": Step(),
    "distillab export runs/<run> --format onnx": Step(),
    "distillab report runs/fashion_mnist/kd_resnet8_fashion_mnist_s* --group-seeds": Step(),
    "distillab bench suite suites/fashion_mnist_leaderboard.yaml": Step(
        ["--only", "kd,ce", "--seeds", "2"], setup=lambda work, mp: tiny_converged_budget(work)),
    "distillab bench tune suites/fashion_mnist_leaderboard.yaml": Step(["--only", "fitnet"]),
    "distillab bench throughput --teacher resnet32x4 --student resnet8x4 --methods kd,fitnet --batch 64": Step(
        ["--warmup", "1", "--steps", "1", "--repeats", "1", "--output", "throughput.json"]),
    "distillab teachers": Step(),
    "distillab models": Step(),
    "distillab methods": Step(),
    "distillab demo": Step(setup=lambda work, mp: shrink_demo(mp)),
    "python -m distillab models": Step(),
    "distillab teachers fetch cifar100_vgg13_repdistiller --from ckpt_epoch_240.pth": Step(
        setup=lambda work, mp: peer_file(work / "ckpt_epoch_240.pth", "vgg13")),
    f"torchrun --nproc_per_node=4 -m distillab train {CIFAR_CONFIG}": Step(
        [*TINY_CIFAR, "--set", "name=kd_torchrun"],
        argv=lambda words: [w.replace("=4", "=2") for w in words]),  # 2 CPU processes on this 2-core machine
    "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 "
    "-m distillab train <config>": Step(
        [*TINY_CIFAR, "--set", "name=kd_two_nodes"],
        argv=lambda words: [{"--nproc_per_node=8": "--nproc_per_node=1", "--master_addr=10.0.0.1":
                             "--master_addr=127.0.0.1", "<config>": CIFAR_CONFIG}.get(w, w) for w in words]),
}


def test_every_readme_command_has_a_plan():
    commands = readme_commands()
    assert set(commands) == set(PLAN), (
        f"README commands without a plan: {sorted(set(commands) - set(PLAN))}; "
        f"plans without a README command: {sorted(set(PLAN) - set(commands))}")


def run_torchrun(words: list[str], work: Path, env: dict[str, str]) -> int:
    """torchrun as the README gives it; the two-machine command as two local processes, node ranks 0 and 1."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if "--nnodes=2" not in words:
        return subprocess.run([*torchrun, *words[1:]], cwd=work, env=env, timeout=600).returncode
    port = str(local_port())
    nodes = [[w.replace("29500", port) for w in words[1:]]]
    nodes.append([w.replace("--node_rank=0", "--node_rank=1") for w in nodes[0]])
    procs = [subprocess.Popen([*torchrun, *node], cwd=work, env=env) for node in nodes]
    return max(p.wait(timeout=600) for p in procs)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist package not installed")
def test_the_readme_commands_run_in_order_outside_the_clone(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "suites", work / "suites")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work / "home"))  # ~/data/cifar, and the teacher cache, live here
    monkeypatch.setenv("DISTILLAB_HOME", str(work / "home" / ".distillab"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = []
    for command in readme_commands():
        step = PLAN[command]
        if step.skip:
            done.append((command, "-", 0.0, step.skip))
            continue
        if step.setup:
            step.setup(work, monkeypatch)
        words = shlex.split(command.replace("runs/<run>", KD_RUN))
        words = (step.argv(words) if step.argv else words) + step.add
        words = [match for w in words for match in (sorted(glob.glob(w)) if "*" in w else [w])]  # as a shell would
        start = time.perf_counter()
        if words[0] == "torchrun":
            rc = run_torchrun(words, work, env)
        elif words[0] == "python":
            rc = subprocess.run([sys.executable, *words[1:]], cwd=work, env=env, capture_output=True).returncode
        else:
            rc = main(words[1:])
        done.append((command, rc, time.perf_counter() - start, " ".join(words[len(shlex.split(command)):])))
        assert rc == 0, f"{command!r} exited {rc}: {capsys.readouterr().err[-2000:]}"
    with capsys.disabled():
        print("\n| README command | exit | seconds | added here |\n|---|---:|---:|---|")
        for command, rc, seconds, added in done:
            print(f"| `{command}` | {rc} | {seconds:.1f} | {added} |")
    assert (work / KD_RUN / "summary.json").is_file() and (work / "student.safetensors").is_file()
    assert (work / "resnet32x4.safetensors").is_file() and (work / "throughput.json").is_file()
    assert (work / "runs" / "cifar100" / "kd_two_nodes" / "summary.json").is_file()
