#!/usr/bin/env python
"""Adversarial audit of the `distillab` command line.

Tries, as a hostile or careless user would, to break the CLI: kills at random moments, races, hand-edited run
files, hostile inputs, overwrites and full / read-only disks. Every attempt runs `python -m distillab ...` in a
subprocess, in a fresh temporary directory, with a timeout (and an address-space limit for memory attacks), and
is classed as one of

    ok                 did the right thing
    data_loss          a file or run that had to survive was changed or deleted (or a record was corrupted)
    code_execution     a command or function named by a config / file ran (a marker file appeared)
    denial_of_service  timed out, or ran into the memory limit
    traceback          a raw Python traceback was shown
    unclear            rc 0 where it should have refused, a silent wrong result, an error that is not one
                       `distillab: error:` line, or an outcome this script cannot judge reliably
    skipped            the situation cannot be simulated here (said why)

Usage (from the repository root, with the project's virtual environment):

    nice -n 10 .venv/bin/python benchmarks/adversarial/audit.py [--only CATEGORY] [--output FILE] [--jobs N]

Tiny runs only (digits, 64 training images, resnet8, 1-2 epochs); a full audit takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_VENV = ROOT / ".venv" / "bin" / "python"
PY = str(_VENV if _VENV.exists() else sys.executable)
CATEGORIES = ["kills", "races", "edited", "hostile", "overwrites", "disks"]
OUTCOMES = ["ok", "data_loss", "code_execution", "denial_of_service", "traceback", "unclear", "skipped"]
MEM_LIMIT = 6 << 30  # RLIMIT_AS for memory attacks
TIMEOUT = 150  # seconds per command (a hang guard; tiny runs take a few seconds)
DOS_TIMEOUT = 60  # seconds for commands that attack time or memory
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("PYTHONWARNINGS", None)
MEM_SIGNS = ("MemoryError", "Cannot allocate memory", "can't allocate memory", "os error 12", "bad_alloc",
             "out of memory", "DefaultCPUAllocator", "Killed")
BASE_DIR: Path = Path("/tmp")  # set in main: replaced by $TMP in the recorded commands


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))


# ----------------------------------------------------------------------------------------------- processes
@dataclass
class Res:
    argv: list[str]
    rc: int | None
    out: str
    err: str
    timed_out: bool
    seconds: float
    mem: bool = False

    @property
    def tb(self) -> bool:
        return "Traceback" in self.err

    @property
    def one_line(self) -> bool:
        lines = self.err.splitlines()
        return len(lines) == 1 and lines[0].startswith("distillab: error:")

    @property
    def mem_blowup(self) -> bool:
        return self.rc != 0 and any(s in self.err for s in MEM_SIGNS)

    def first_err(self, n: int = 180) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        if not lines:
            return "(no stderr)"
        ours = [line for line in lines if line.startswith("distillab: error:")]
        text = lines[-1] if self.tb else (ours[0] if ours else lines[0])
        more = ""
        if len(lines) > 1:
            other = next((line for line in lines if line != text), "")
            more = f" (+{len(lines) - 1} other stderr lines, e.g. {other[:90]!r})"
        return (text if len(text) <= n else text[:n] + "...") + more

    def display(self) -> str:
        argv = ["python" if a == PY else a for a in self.argv]
        return shlex.join(argv).replace(str(BASE_DIR), "$TMP")


class Spawned:
    """A CLI process started in the background (stdout/stderr into files, so pipes never fill up)."""

    def __init__(self, args: list, cwd: Path, mem: bool = False) -> None:
        self.argv = [PY, "-m", "distillab", *map(str, args)]
        self.fo, self.fe = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 (closed in collect)
        self.t0 = time.monotonic()
        self.mem = mem
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdout=self.fo, stderr=self.fe, stdin=subprocess.DEVNULL,
                                     env=ENV, start_new_session=True, preexec_fn=_limit_memory if mem else None)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def collect(self, timeout: float = TIMEOUT) -> Res:
        timed_out = False
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        out, err = [(f.seek(0), f.read().decode(errors="replace"), f.close())[1] for f in (self.fo, self.fe)]
        return Res(self.argv, self.proc.returncode, out, err, timed_out, time.monotonic() - self.t0, self.mem)


def cli(args: list, cwd: Path, timeout: float = TIMEOUT, mem: bool = False) -> Res:
    return Spawned(args, cwd, mem).collect(timeout)


def wait_for_file(path: Path, sp: Spawned, timeout: float = 120.0) -> bool:
    """True once `path` exists; False if the process ended first or the wait timed out."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if sp.proc.poll() is not None or time.monotonic() > deadline:
            return path.is_file()
        time.sleep(0.005)
    return True


# ----------------------------------------------------------------------------------------------- files
def run_cfg(out_dir: Path, name: str, *, epochs: int = 1, subset: int = 64, seed: int = 0,
            extra: dict | None = None) -> dict:
    cfg = {"output_dir": str(out_dir), "name": name, "seed": seed,
           "data": {"name": "digits", "val_size": 60, "train_subset": subset,
                    "augment": {"flip": False, "crop_padding": 0}},
           "student": {"name": "resnet8"}, "method": {"name": "ce"},
           "train": {"epochs": epochs, "batch_size": 32, "progress": False}}
    return merge(cfg, extra or {})


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg, indent=1) + "\n")  # JSON is YAML
    return path


def snap(path: Path) -> Any:
    """Bytes of a file, {relpath: bytes} of a directory (without the lock file), or None if missing."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return ("dangling", os.readlink(path))
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "dir")
                for p in sorted(path.rglob("*")) if p.name != ".lock"}
    return None


def diff(before: Any, after: Any, what: str) -> str | None:
    if before == after:
        return None
    if after is None:
        return f"{what} is gone"
    if isinstance(before, dict) and isinstance(after, dict):
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return f"{what} changed: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}"
    return f"{what} was overwritten"


def metric_epochs(run: Path) -> list:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line).get("epoch"))
        except (json.JSONDecodeError, AttributeError):
            out.append("torn")
    return out


def ckpt_state(run: Path) -> tuple[Any, str | None]:
    """(epoch, step) of a run's checkpoint loaded with weights_only=True, or (None, why it does not load)."""
    import torch

    try:
        s = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        return (s["epoch"], s.get("step", 0)), None
    except Exception as exc:  # any failure means "does not load"
        return None, f"checkpoint does not load: {type(exc).__name__}: {str(exc)[:100]}"


def edit_ckpt(run: Path, fn: Callable[[dict], Any]) -> None:
    import torch

    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    new = fn(state)
    torch.save(state if new is None else new, path)


def same_student(a: Path, b: Path) -> bool:
    if not (a.is_file() and b.is_file()):
        return False
    if a.read_bytes() == b.read_bytes():
        return True
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def eval_acc(run: Path, cwd: Path) -> tuple[Res, float | None]:
    r = cli(["eval", run], cwd)
    m = re.search(r"test\W+[\d,]+\W+([\d.]+)", r.out)
    return r, (float(m.group(1)) if m else None)


def edit_yaml(path: Path, fn: Callable[[dict], None]) -> None:
    import yaml

    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class Evil:
    """Unpickling this runs a shell command (a hostile checkpoint)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def sparse_safetensors(path: Path) -> Path:
    """A valid header claiming one 32 GiB F32 tensor, on a sparse file of that length (no disk used)."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [8589934592], "data_offsets": [0, 34359738368]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
    os.truncate(path, 8 + len(header) + 34359738368)
    return path


def raw_safetensors(path: Path, header: bytes | str, length: int | None = None, body: bytes = b"") -> Path:
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body)
    return path


# ----------------------------------------------------------------------------------------------- verdicts
def judge(main: Res | None, expect: str, *, others: tuple = (), lost: str | None = None, marker: Path | None = None,
          wrong: str | None = None, note: str = "", checks: dict | None = None) -> dict:
    """Class an attempt. expect: 'refuse' (must exit non-zero with one error line), 'succeed' or 'either'."""
    results = [r for r in (*others, main) if r is not None]
    v = {"commands": [r.display() for r in results], "rc": main.rc if main else None,
         "traceback": any(r.tb for r in results),
         "one_line_error": (main.one_line if main is not None and main.rc != 0 else None),
         "seconds": round(sum(r.seconds for r in results), 1), "checks": checks or {}}
    dos = next((r for r in results if r.timed_out), None)
    mem = next((r for r in results if r.mem and r.mem_blowup), None)
    if marker is not None and Path(marker).exists():
        outcome, reason = "code_execution", f"marker file {Path(marker).name} was written by the command"
    elif lost:
        outcome, reason = "data_loss", lost
    elif dos is not None:
        outcome, reason = "denial_of_service", f"no answer within {dos.seconds:.0f} s (killed): {dos.display()[:120]}"
    elif mem is not None:
        outcome, reason = "denial_of_service", f"ran into the {MEM_LIMIT >> 30} GiB memory limit: {mem.first_err()}"
    elif v["traceback"]:
        r = next(r for r in results if r.tb)
        outcome, reason = "traceback", f"rc {r.rc}: {r.first_err()}"
    elif main is None:
        outcome, reason = "unclear", wrong or "no command was judged"
    elif expect == "refuse" and main.rc == 0:
        outcome, reason = "unclear", wrong or "rc 0 where it should have refused"
    elif expect == "succeed" and main.rc != 0:
        outcome, reason = "unclear", f"refused a valid request (rc {main.rc}): {main.first_err()}"
    elif main.rc not in (0, None) and not main.one_line and expect != "signal":
        outcome, reason = "unclear", f"error is not one 'distillab: error:' line (rc {main.rc}): {main.first_err()}"
    elif wrong:
        outcome, reason = "unclear", wrong
    else:
        outcome = "ok"
        reason = note or (f"refused: {main.first_err(140)}" if main.rc else "succeeded")
    v.update(outcome=outcome, reason=reason)
    return v


def skipped(why: str) -> dict:
    return {"commands": [], "rc": None, "traceback": False, "one_line_error": None, "seconds": 0.0, "checks": {},
            "outcome": "skipped", "reason": why}


# ----------------------------------------------------------------------------------------------- fixtures
class Context:
    """Shared, lazily built runs (each trained once and copied by the attempts that change them)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.fix = base / "fixtures"
        self.fix.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._values: dict[str, Any] = {}
        self._guard = threading.Lock()
        self.mount_ok: bool | None = None

    def get(self, name: str) -> Any:
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._values:
                value = getattr(self, f"_make_{name}")()
                self._values[name] = value
            return self._values[name]

    def _train(self, cfg: dict, what: str, extra_args: tuple = ()) -> Path:
        path = write_cfg(self.fix / f"{cfg['name']}.yaml", cfg)
        r = cli(["train", path, *extra_args], self.fix)
        run = Path(cfg["output_dir"]) / cfg["name"]
        if r.rc != 0:
            raise RuntimeError(f"fixture {what} failed: {r.err[-2000:]}")
        return run

    def _make_done1(self) -> Path:  # a finished 1-epoch run (resumable to 2 epochs with --set train.epochs=2)
        return self._train(run_cfg(self.fix / "runs", "r"), "done1")

    def _make_done2(self) -> Path:  # done1 resumed to 2 epochs, untouched: the reference for edited resumes
        run = copy_run(self.get("done1"), self.fix / "ref2", "r")
        r = cli(["train", "--resume", run, "--set", "train.epochs=2"], self.fix)
        if r.rc != 0:
            raise RuntimeError(f"fixture done2 failed: {r.err[-2000:]}")
        return run

    def _make_teacher(self) -> Path:  # a resnet14 teacher, trained alone (ce)
        return self._train(run_cfg(self.fix / "runs", "teacher", extra={"student": {"name": "resnet14"}}), "teacher")

    def dfa_cfg(self, out_dir: Path, name: str = "dfa", extra: dict | None = None) -> dict:
        return run_cfg(out_dir, name, extra=merge({
            "teacher": {"name": "resnet14", "checkpoint": str(self.get("teacher"))},
            "method": {"name": "dfa", "options": {"fd_weight": 1.0,
                                                   "search": {"epochs_per_group": 1, "beta_lr": 0.01}}}},
            extra or {}))

    def _make_dfa(self) -> Path:  # a finished staged run (DFA: search stage, then distillation)
        return self._train(self.dfa_cfg(self.fix / "runs"), "dfa")

    def kill_cfg(self, out_dir: Path, name: str = "k") -> dict:  # long enough to be killed at random moments
        return run_cfg(out_dir, name, epochs=KILL_EPOCHS, subset=KILL_SUBSET)

    def _make_kill_ref(self) -> Path:
        return self._train(self.kill_cfg(self.fix / "killref"), "kill_ref")

    def _make_mid(self) -> Path | None:
        """A run stopped by SIGTERM in the middle of an epoch (checkpoint with step > 0), or None."""
        for i in range(4):
            out = self.fix / f"mid{i}"
            cfg = write_cfg(self.fix / f"mid{i}.yaml", self.kill_cfg(out))
            sp = Spawned(["train", cfg], self.fix)
            run = out / "k"
            if not wait_for_file(run / "checkpoints" / "last.pt", sp):
                sp.collect()
                continue
            time.sleep(0.25 + 0.07 * i)  # an epoch takes about 0.15 s: stop inside epoch 2 or 3
            sp.signal(signal.SIGTERM)
            r = sp.collect()
            state, _ = ckpt_state(run)
            if r.rc == 128 + signal.SIGTERM and state and state[1] and state[0] >= 2:
                return run
        return None


KILL_EPOCHS, KILL_SUBSET = 6, 640


def copy_run(template: Path, out_dir: Path, name: str) -> Path:
    dest = Path(out_dir) / name
    shutil.copytree(template, dest, symlinks=True)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------------------------- registry
@dataclass
class Attempt:
    category: str
    name: str
    fn: Callable[[Context, Path], dict]


ATTEMPTS: list[Attempt] = []


def add(category: str, name: str, fn: Callable[[Context, Path], dict]) -> None:
    ATTEMPTS.append(Attempt(category, name, fn))


# ======================================================================================================= kills
def kill_and_recover(ctx: Context, w: Path, plan: Callable[[Spawned, Path], tuple[str, list[Res]]]) -> dict:
    """Start the kill-length run, apply `plan` (signals), then resume (or start again if nothing was
    checkpointed) and compare with the uninterrupted run."""
    ref = ctx.get("kill_ref")
    cfg = write_cfg(w / "k.yaml", ctx.kill_cfg(w / "runs"))
    run = w / "runs" / "k"
    sp = Spawned(["train", cfg], w)
    what, first = plan(sp, run)
    if what == "finished":
        return judge(first[-1], "succeed", others=tuple(first[:-1]),
                     wrong="the run finished before the signal: nothing was tested")
    others = list(first)
    bad_rc = what.split("; ", 1)[1] if "; rc " in what else None
    state, _ = ckpt_state(run)
    if state is not None:
        landed = "after the last epoch" if state == (KILL_EPOCHS, 0) and (run / "summary.json").is_file() else \
            f"checkpoint then at epoch {state[0]}, step {state[1]}"
        what += f", {landed}"
    r = cli(["train", "--resume", run], w)
    path = "resume"
    if r.rc != 0 and r.one_line and not (run / "checkpoints" / "last.pt").is_file():
        others.append(r)  # killed before the first checkpoint: the documented way is to start it again
        r = cli(["train", cfg, "--force"] if run.exists() else ["train", cfg], w)
        path = "no checkpoint: started again"
    checks = {"signals": what, "recovery": path}
    state, why = ckpt_state(run)
    epochs = metric_epochs(run)
    checks.update(checkpoint=state, metrics_epochs=epochs)
    wrong = None
    if r.rc == 0:
        if why:
            wrong = why
        elif epochs != list(range(1, KILL_EPOCHS + 1)):
            return judge(r, "succeed", others=tuple(others), checks=checks,
                         lost=f"metrics.jsonl epochs are {epochs}, not 1..{KILL_EPOCHS} once each")
        elif not same_student(run / "student.safetensors", ref / "student.safetensors"):
            wrong = "the resumed student differs from the uninterrupted run's"
        elif bad_rc:
            wrong = f"the signalled process exited with an undocumented code{bad_rc.removeprefix('rc')}"
    return judge(r, "succeed", others=tuple(others), wrong=wrong, checks=checks,
                 note=f"{what}; {path}; final student identical to the uninterrupted run's")


def signal_after_ckpt(sig: int, delay: float, second: int | None = None, gap: float = 0.0):
    def plan(sp: Spawned, run: Path):
        if not wait_for_file(run / "checkpoints" / "last.pt", sp):
            return "finished", [sp.collect()]
        time.sleep(delay)
        if sp.proc.poll() is not None:
            return "finished", [sp.collect()]
        sp.signal(sig)
        if second is not None:
            time.sleep(gap)
            sp.signal(second)
        r = sp.collect()
        names = signal.Signals(sig).name + (f"+{signal.Signals(second).name}" if second else "")
        expected = {-signal.SIGKILL} if second == signal.SIGKILL else {128 + sig, -sig}
        if sig == signal.SIGKILL:
            expected = {-signal.SIGKILL}
        bad = f"; rc {r.rc}, expected one of {sorted(expected)}" if r.rc not in expected else ""
        return f"{names} {delay:.2f}s after the first checkpoint (rc {r.rc}){bad}", [r]
    return plan


def signal_at(sig: int, delay: float):
    def plan(sp: Spawned, run: Path):
        time.sleep(delay)
        if sp.proc.poll() is not None:
            return "finished", [sp.collect()]
        sp.signal(sig)
        r = sp.collect()
        return f"{signal.Signals(sig).name} {delay:.2f}s after start (rc {r.rc})", [r]
    return plan


def kill_twice(ctx: Context, w: Path, d1: float, d2: float) -> dict:
    """SIGKILL after the first checkpoint, then SIGKILL the resuming process at a random moment, then resume."""

    def plan(sp: Spawned, run: Path):
        if not wait_for_file(run / "checkpoints" / "last.pt", sp):
            return "finished", [sp.collect()]
        time.sleep(d1)
        sp.signal(signal.SIGKILL)
        first = sp.collect()
        again = Spawned(["train", "--resume", run], w)
        time.sleep(d2)
        if again.proc.poll() is not None:
            return "finished", [first, again.collect()]
        again.signal(signal.SIGKILL)
        return f"SIGKILL {d1:.2f}s after the first checkpoint, SIGKILL of the resume {d2:.2f}s in", [first,
                                                                                                   again.collect()]
    return kill_and_recover(ctx, w, plan)


def kill_dfa_search(ctx: Context, w: Path, delay: float) -> dict:
    """SIGKILL a staged DFA run during its search stage, resume, compare with the uninterrupted DFA run."""
    ref = ctx.get("dfa")
    cfg = write_cfg(w / "dfa.yaml", ctx.dfa_cfg(w / "runs"))
    run = w / "runs" / "dfa"
    sp = Spawned(["train", cfg], w)
    if not wait_for_file(run / "stages" / "search" / "checkpoints" / "last.pt", sp):
        r = sp.collect()
        return judge(r, "succeed", wrong="the search stage ended before the signal: nothing was tested")
    time.sleep(delay)
    sp.signal(signal.SIGKILL)
    first = sp.collect()
    r = cli(["train", "--resume", run], w)
    checks = {"metrics_epochs": metric_epochs(run), "search_epochs": metric_epochs(run / "stages" / "search")}
    wrong = lost = None
    if r.rc == 0:
        if checks["search_epochs"] != sorted(set(checks["search_epochs"])):
            lost = f"search metrics epochs duplicated: {checks['search_epochs']}"
        elif not same_student(run / "student.safetensors", ref / "student.safetensors"):
            wrong = "the resumed DFA student differs from the uninterrupted run's"
    return judge(r, "succeed", others=(first,), wrong=wrong, lost=lost, checks=checks,
                 note="killed in the search stage; resumed to the uninterrupted run's student")


def register_kills(rng: random.Random) -> None:
    for i in range(3):
        d = rng.uniform(0, 0.45)
        add("kills", f"sigterm_after_ckpt_{i}", lambda c, w, d=d: kill_and_recover(c, w, signal_after_ckpt(
            signal.SIGTERM, d)))
    for i in range(3):
        d = rng.uniform(0, 0.45)
        add("kills", f"sigkill_after_ckpt_{i}", lambda c, w, d=d: kill_and_recover(c, w, signal_after_ckpt(
            signal.SIGKILL, d)))
    d = rng.uniform(0, 0.45)
    add("kills", "sigint_after_ckpt", lambda c, w, d=d: kill_and_recover(c, w, signal_after_ckpt(signal.SIGINT, d)))
    d = rng.uniform(0, 0.45)
    add("kills", "double_sigterm", lambda c, w, d=d: kill_and_recover(c, w, signal_after_ckpt(
        signal.SIGTERM, d, signal.SIGTERM, 0.05)))
    d = rng.uniform(0, 0.45)
    add("kills", "sigterm_then_sigkill_mid_write", lambda c, w, d=d: kill_and_recover(c, w, signal_after_ckpt(
        signal.SIGTERM, d, signal.SIGKILL, 0.01)))
    for i in range(2):
        d = rng.uniform(0.3, 3.0)
        add("kills", f"sigkill_at_random_start_{i}", lambda c, w, d=d: kill_and_recover(c, w, signal_at(
            signal.SIGKILL, d)))
    d1, d2 = rng.uniform(0, 0.45), rng.uniform(1.0, 4.0)
    add("kills", "sigkill_twice", lambda c, w, d1=d1, d2=d2: kill_twice(c, w, d1, d2))
    d = rng.uniform(0, 0.3)
    add("kills", "sigkill_dfa_search_stage", lambda c, w, d=d: kill_dfa_search(c, w, d))


# ======================================================================================================= races
def race_train(ctx: Context, w: Path, extra: list, prepare: str | None) -> dict:
    cfg = write_cfg(w / "r.yaml", run_cfg(w / "runs", "r", extra={"train": {"epochs": 2}}))
    run = w / "runs" / "r"
    if prepare == "finished":
        copy_run(ctx.get("done2"), w / "runs", "r")
    elif prepare == "resumable":
        copy_run(ctx.get("done1"), w / "runs", "r")
    args = ["train", "--resume", run, "--set", "train.epochs=2"] if "--resume" in extra else ["train", cfg, *extra]
    a, b = Spawned(args, w), Spawned(args, w)
    ra, rb = a.collect(), b.collect()
    done = [r for r in (ra, rb) if r.rc == 0]
    epochs = metric_epochs(run)
    checks = {"rcs": [ra.rc, rb.rc], "metrics_epochs": epochs}
    lost = None if epochs == [1, 2] else f"metrics.jsonl epochs are {epochs}, not [1, 2] once each"
    _, why = ckpt_state(run)
    lost = lost or why
    failed = [r for r in (ra, rb) if r.rc != 0]
    main = failed[0] if failed else rb
    wrong = None
    if len(done) == 2:
        wrong = "both processes exited 0: the run was trained twice (or one silently did nothing)"
    elif not done:
        wrong = "neither process finished the run"
    elif not same_student(run / "student.safetensors", ctx.get("done2") / "student.safetensors"):
        wrong = "the surviving student differs from a clean run's"
    return judge(main, "refuse" if len(done) == 1 else "either", others=tuple(r for r in (ra, rb) if r is not main),
                 lost=lost, wrong=wrong, checks=checks, note=f"one trained, the other refused: {main.first_err(100)}")


def race_force_while_training(ctx: Context, w: Path) -> dict:
    """`train --force` on a run directory while another process trains it (a long run, so that they overlap)."""
    epochs = 40
    cfg = write_cfg(w / "k.yaml", run_cfg(w / "runs", "k", epochs=epochs, subset=KILL_SUBSET))
    run = w / "runs" / "k"
    sp = Spawned(["train", cfg], w)
    if not wait_for_file(run / "checkpoints" / "last.pt", sp):
        return judge(sp.collect(), "succeed", wrong="the run ended before the second process started")
    r = cli(["train", cfg, "--force"], w)
    overlapped = sp.proc.poll() is None
    first = sp.collect()
    lost = None
    if first.rc != 0:
        lost = f"the running training was broken (rc {first.rc}): {first.first_err()}"
    elif metric_epochs(run) != list(range(1, epochs + 1)):
        lost = f"metrics epochs {metric_epochs(run)}"
    wrong = None if overlapped or r.rc != 0 else "the first run had ended before --force finished: no overlap"
    return judge(r, "refuse", others=(first,), lost=lost, wrong=wrong, checks={"overlapped": overlapped})


def race_resume_killed(ctx: Context, w: Path) -> dict:
    """A SIGKILLed run requeued twice at once (two --resume together)."""
    ref = ctx.get("kill_ref")
    cfg = write_cfg(w / "k.yaml", ctx.kill_cfg(w / "runs"))
    run = w / "runs" / "k"
    sp = Spawned(["train", cfg], w)
    if not wait_for_file(run / "checkpoints" / "last.pt", sp):
        return judge(sp.collect(), "succeed", wrong="finished before the kill")
    sp.signal(signal.SIGKILL)
    killed = sp.collect()
    a, b = Spawned(["train", "--resume", run], w), Spawned(["train", "--resume", run], w)
    ra, rb = a.collect(), b.collect()
    epochs = metric_epochs(run)
    ok = [r for r in (ra, rb) if r.rc == 0]
    lost = None if epochs == list(range(1, KILL_EPOCHS + 1)) else f"metrics epochs {epochs}"
    wrong = None
    if len(ok) != 1:
        wrong = f"{len(ok)} of the 2 resumes exited 0"
    elif not same_student(run / "student.safetensors", ref / "student.safetensors"):
        wrong = "the student differs from the uninterrupted run's"
    main = next((r for r in (ra, rb) if r.rc != 0), rb)
    return judge(main, "refuse" if len(ok) == 1 else "either", others=(killed, *(r for r in (ra, rb) if r is not main)),
                 lost=lost, wrong=wrong, checks={"rcs": [ra.rc, rb.rc], "metrics_epochs": epochs})


def suite_files(w: Path) -> Path:
    ce = write_cfg(w / "ce.yaml", {k: v for k, v in run_cfg(w, "x").items() if k not in ("output_dir", "name")})
    suite = w / "suite.yaml"
    suite.write_text(f"name: tiny\noutput_dir: {w / 'runs'}\nresults_dir: {w / 'results'}\n"
                     f"runs:\n  ce: {{config: {ce}}}\n"
                     f"  ce_smooth: {{config: {ce}, set: [method.options.label_smoothing=0.1]}}\n")
    return suite


def race_suites(ctx: Context, w: Path, n: int) -> dict:
    suite = suite_files(w)
    procs = [Spawned(["bench", "suite", suite, "--seeds", "2"], w) for _ in range(n)]
    res = [p.collect() for p in procs]
    names = ["ce_s0", "ce_s1", "ce_smooth_s0", "ce_smooth_s1"]
    trained = {name: sum(len(re.findall(rf"^{name}: ce resnet8 on digits", r.out, re.M)) for r in res)
               for name in names}
    epochs = {name: metric_epochs(w / "runs" / name) for name in names}
    checks = {"rcs": [r.rc for r in res], "times_trained": trained, "metrics_epochs": epochs}
    lost = next((f"{k}: metrics epochs {v}" for k, v in epochs.items() if v != [1]), None)
    wrong = None
    if any(v != 1 for v in trained.values()):
        wrong = f"runs trained {trained} times (each should be trained once)"
    elif not (w / "results" / "tiny.json").is_file():
        wrong = "no results/tiny.json written"
    failed = [r for r in res if r.rc != 0]
    main = failed[0] if failed else res[-1]
    return judge(main, "either", others=tuple(r for r in res if r is not main), lost=lost, wrong=wrong, checks=checks,
                 note=f"{n} suite processes: every run trained once, rcs {[r.rc for r in res]}")


def race_export_same_output(ctx: Context, w: Path) -> dict:
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    out = w / "student.safetensors"
    a, b = Spawned(["export", run, "--output", out], w), Spawned(["export", run, "--output", out], w)
    ra, rb = a.collect(), b.collect()
    wrong = None
    try:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            if "distillab" not in (f.metadata() or {}):
                wrong = "the written file has no model card"
    except Exception as exc:
        wrong = f"the output does not load: {exc}"
    main = next((r for r in (ra, rb) if r.rc != 0), rb)
    return judge(main, "either", others=(ra,) if main is rb else (rb,), wrong=wrong,
                 note=f"two exports to one file: rcs {[ra.rc, rb.rc]}, the file is whole")


def race_convert_same_output(ctx: Context, w: Path) -> dict:
    run = ctx.get("done1")
    out = w / "c.safetensors"
    args = ["convert", run, out, "--model", "resnet8", "--num-classes", "10", "--in-channels", "1"]
    a, b = Spawned(args, w), Spawned(args, w)
    ra, rb = a.collect(), b.collect()
    wrong = None
    try:
        from safetensors.torch import load_file

        load_file(str(out))
    except Exception as exc:
        wrong = f"output does not load: {exc}"
    both = ra.rc == 0 and rb.rc == 0
    main = next((r for r in (ra, rb) if r.rc != 0), rb)
    return judge(main, "either", others=(ra,) if main is rb else (rb,),
                 wrong=wrong or ("both converts exited 0 although neither had --force: one overwrote the other's "
                                 "file" if both else None),
                 note=f"rcs {[ra.rc, rb.rc]}")


def register_races() -> None:
    add("races", "two_trains_fresh_config", lambda c, w: race_train(c, w, [], None))
    add("races", "two_trains_force_on_finished", lambda c, w: race_train(c, w, ["--force"], "finished"))
    add("races", "two_resumes_of_one_run", lambda c, w: race_train(c, w, ["--resume"], "resumable"))
    add("races", "force_while_training", race_force_while_training)
    add("races", "two_resumes_after_sigkill", race_resume_killed)
    add("races", "two_bench_suites", lambda c, w: race_suites(c, w, 2))
    add("races", "three_bench_suites", lambda c, w: race_suites(c, w, 3))
    add("races", "two_exports_same_output", race_export_same_output)
    add("races", "two_converts_same_output", race_convert_same_output)


# ======================================================================================================= edited
def resume_edited(ctx: Context, w: Path, edit: Callable[[Path], None], *, template: str = "done1",
                  sets: tuple = ("train.epochs=2",), compare_ref: bool = True, expect: str = "either",
                  what: str = "", mention: str | None = None) -> dict:
    """Copy a run, hand-edit it, `--resume`; a refusal must leave it byte-identical, a success must equal the
    unedited resume (same student) with each epoch once in metrics.jsonl."""
    source = ctx.get(template)
    if source is None:
        return skipped(f"fixture {template} could not be made")
    run = copy_run(source, w / "runs", "r")
    edit(run)
    before = snap(run)
    args = ["train", "--resume", run]
    for s in sets:
        args += ["--set", s]
    r = cli(args, w)
    checks = {"metrics_epochs": metric_epochs(run)}
    if r.rc != 0:
        wrong = (f"the error does not name {mention} (the README promises a message naming the file and the "
                 f"problem): {r.first_err()}") if mention and mention not in r.err else None
        return judge(r, expect, lost=diff(before, snap(run), "the refused run"), checks=checks, wrong=wrong)
    epochs = checks["metrics_epochs"]
    if len(epochs) != len(set(epochs)) or any(not isinstance(e, int) for e in epochs):
        return judge(r, expect, lost=f"metrics.jsonl epochs are {epochs}", checks=checks)
    wrong = None
    if compare_ref and not same_student(run / "student.safetensors", ctx.get("done2") / "student.safetensors"):
        wrong = f"resumed silently with {what or 'the edit'}: the student differs from an unedited resume's"
    return judge(r, expect, wrong=wrong, checks=checks,
                 note=f"resumed; the edit had no effect on the result ({what})" if what else "")


def set_config(path_in_cfg: str, value: Any) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        def fn(d):
            keys = path_in_cfg.split(".")
            for k in keys[:-1]:
                d = d[k]
            d[keys[-1]] = value
        edit_yaml(run / "config.yaml", fn)
    return edit


def ckpt_edit(fn: Callable[[dict], Any]) -> Callable[[Path], None]:
    return lambda run: edit_ckpt(run, fn)


def metrics_edit(text_fn: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        p = run / "metrics.jsonl"
        p.write_text(text_fn(p.read_text()))
    return edit


def fewer_epochs_than_done(ctx: Context, w: Path) -> dict:
    run = copy_run(ctx.get("done2"), w / "runs", "r")
    before = snap(run)
    r = cli(["train", "--resume", run, "--set", "train.epochs=1"], w)
    lost = diff(before, snap(run), "the 2-epoch run")
    return judge(r, "either", lost=lost, checks={"metrics_epochs": metric_epochs(run)},
                 note="left byte-identical" if r.rc == 0 else "")


def mid_epoch_fewer_epochs(ctx: Context, w: Path, minus: int) -> dict:
    mid = ctx.get("mid")
    if mid is None:
        return skipped("could not produce a mid-epoch SIGTERM checkpoint")
    run = copy_run(mid, w / "runs", "k")
    (epoch, step), _ = ckpt_state(run)
    target = epoch - minus
    if target < 1:
        return skipped(f"the mid-epoch checkpoint is at epoch {epoch}: no smaller epoch count to ask for")
    before = snap(run)
    r = cli(["train", "--resume", run, "--set", f"train.epochs={target}"], w)
    checks = {"checkpoint": [epoch, step], "asked_epochs": target, "metrics_epochs": metric_epochs(run)}
    if r.rc != 0:
        return judge(r, "either", lost=diff(before, snap(run), "the refused run"), checks=checks)
    epochs = checks["metrics_epochs"]
    if len(epochs) != len(set(epochs)):
        return judge(r, "either", lost=f"metrics.jsonl epochs {epochs}", checks=checks)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    er, acc = eval_acc(run, w)
    checks.update(summary_test_acc=summary.get("test_acc"), eval_test_acc=acc, summary_epochs=summary.get("epochs"))
    wrong = None
    if acc is None or summary.get("test_acc") is None:
        wrong = f"cannot compare the summary with the saved student (eval rc {er.rc})"
    elif abs(round(summary["test_acc"], 2) - acc) > 0.006:
        wrong = f"summary test_acc {summary['test_acc']:.2f} but the saved student scores {acc:.2f}"
    elif max(epochs, default=0) > target and summary.get("epochs") == target:
        wrong = f"metrics hold epochs {epochs} but the summary says {target} epochs"
    return judge(r, "either", others=(er,), wrong=wrong, checks=checks,
                 note=f"finished consistently (summary test_acc = saved student's, epochs {epochs})")


def summary_deleted(ctx: Context, w: Path) -> dict:
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    (run / "summary.json").unlink()
    r = cli(["train", "--resume", run], w)
    if r.rc != 0:
        return judge(r, "either")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    er, acc = eval_acc(run, w)
    wrong = None
    if acc is None or "test_acc" not in summary:
        wrong = "no summary or no eval to compare"
    elif abs(round(summary["test_acc"], 2) - acc) > 0.006:
        wrong = f"summary test_acc {summary['test_acc']:.2f} but the saved student scores {acc:.2f}"
    return judge(r, "either", others=(er,), wrong=wrong, note="summary rewritten, equal to the student's accuracy",
                 checks={"metrics_epochs": metric_epochs(run)})


def marker_removed_force(ctx: Context, w: Path) -> dict:
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    (run / ".distillab-run").unlink()
    cfg = write_cfg(w / "r.yaml", run_cfg(w / "runs", "r"))
    before = snap(run)
    r = cli(["train", cfg, "--force"], w)
    return judge(r, "refuse", lost=diff(before, snap(run), "the run without its marker"))


def marker_removed_resume(ctx: Context, w: Path) -> dict:
    return resume_edited(ctx, w, lambda run: (run / ".distillab-run").unlink(), what="no .distillab-run marker")


def register_edited() -> None:
    add("edited", "config_lr_edited_then_resume",
        lambda c, w: resume_edited(c, w, set_config("train.optim.lr", 0.5), what="lr 0.05 -> 0.5"))
    add("edited", "config_seed_edited_then_resume",
        lambda c, w: resume_edited(c, w, set_config("seed", 7), what="seed 0 -> 7"))
    add("edited", "config_train_subset_edited_then_resume",
        lambda c, w: resume_edited(c, w, set_config("data.train_subset", 32), what="train_subset 64 -> 32"))
    add("edited", "config_optimizer_edited_then_resume",
        lambda c, w: resume_edited(c, w, set_config("train.optim.name", "adamw"), what="sgd -> adamw"))
    add("edited", "config_student_edited_then_resume",
        lambda c, w: resume_edited(c, w, set_config("student.name", "resnet14"), expect="refuse"))
    add("edited", "config_unknown_key_then_resume",
        lambda c, w: resume_edited(c, w, set_config("train.optim.momentun", 0.5), expect="refuse"))
    add("edited", "config_not_yaml_then_resume",
        lambda c, w: resume_edited(c, w, lambda run: (run / "config.yaml").write_text("train: {epochs: [\n"),
                                   expect="refuse"))
    add("edited", "config_deleted_then_resume",
        lambda c, w: resume_edited(c, w, lambda run: (run / "config.yaml").unlink(), expect="refuse"))
    add("edited", "ckpt_run_id_removed",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.pop("run_id")), what="no run_id in the checkpoint"))
    add("edited", "ckpt_run_id_of_another_run",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(run_id="0" * 32)), expect="refuse"))
    add("edited", "ckpt_scaler_missing",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.pop("scaler")), expect="refuse"))
    add("edited", "ckpt_optimizer_missing",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.pop("optimizer")), expect="refuse"))
    add("edited", "ckpt_epoch_999",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(epoch=999)), expect="refuse"))
    add("edited", "ckpt_epoch_minus_5",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(epoch=-5)), expect="refuse"))
    add("edited", "ckpt_huge_step",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(step=10 ** 15)), expect="refuse"))
    add("edited", "ckpt_bad_rng_cpu_size",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(rng_cpu=s["rng_cpu"][:100])),
                                   expect="refuse"))
    add("edited", "ckpt_rng_cpu_float",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(rng_cpu=s["rng_cpu"].float())),
                                   expect="refuse"))
    add("edited", "ckpt_epoch_is_string",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(epoch="one")), expect="refuse"))
    add("edited", "ckpt_epoch_is_float",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(epoch=0.5)), expect="refuse"))
    add("edited", "ckpt_method_is_list",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(method=[1, 2])), expect="refuse"))
    add("edited", "ckpt_partial_is_string",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(step=1, partial="x")), expect="refuse"))
    add("edited", "ckpt_is_a_list", lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: [1, 2, 3]), expect="refuse"))
    add("edited", "ckpt_truncated",
        lambda c, w: resume_edited(c, w, lambda run: (run / "checkpoints/last.pt").write_bytes(
            (run / "checkpoints/last.pt").read_bytes()[:5000]), expect="refuse", mention="last.pt"))
    add("edited", "ckpt_truncated_half",
        lambda c, w: resume_edited(c, w, lambda run: (run / "checkpoints/last.pt").write_bytes(
            (run / "checkpoints/last.pt").read_bytes()[:300000]), expect="refuse", mention="last.pt"))
    add("edited", "ckpt_empty_file",
        lambda c, w: resume_edited(c, w, lambda run: (run / "checkpoints/last.pt").write_bytes(b""),
                                   expect="refuse", mention="last.pt"))
    add("edited", "mid_ckpt_huge_step",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(step=10 ** 15)), template="mid", sets=(),
                                   compare_ref=False, expect="refuse"))
    add("edited", "mid_ckpt_negative_step",
        lambda c, w: resume_edited(c, w, ckpt_edit(lambda s: s.update(step=-3)), template="mid", sets=(),
                                   compare_ref=False, expect="refuse"))
    add("edited", "ckpt_replaced_by_directory",
        lambda c, w: resume_edited(c, w, lambda run: ((run / "checkpoints/last.pt").unlink(),
                                                      (run / "checkpoints/last.pt").mkdir()), expect="refuse"))
    add("edited", "metrics_epoch_not_numeric",
        lambda c, w: resume_edited(c, w, metrics_edit(lambda t: t.replace('"epoch": 1', '"epoch": "one"')),
                                   expect="either"))
    add("edited", "metrics_line_not_a_dict",
        lambda c, w: resume_edited(c, w, metrics_edit(lambda t: "[1, 2]\n" + t), expect="either"))
    add("edited", "metrics_extra_future_epochs",
        lambda c, w: resume_edited(c, w, metrics_edit(lambda t: t + t.replace('"epoch": 1', '"epoch": 2')
                                                      + t.replace('"epoch": 1', '"epoch": 3'))))
    add("edited", "report_on_metrics_epoch_not_numeric", report_bad_metrics)
    add("edited", "marker_removed_then_resume", marker_removed_resume)
    add("edited", "marker_other_run_id_then_resume",
        lambda c, w: resume_edited(c, w, lambda run: (run / ".distillab-run").write_text(
            "a distillab run directory\nrun_id: " + "f" * 32 + "\n"), expect="refuse"))
    add("edited", "marker_removed_then_force", marker_removed_force)
    add("edited", "resume_with_fewer_epochs_than_done", fewer_epochs_than_done)
    add("edited", "mid_epoch_ckpt_resumed_with_epochs_equal_done",
        lambda c, w: mid_epoch_fewer_epochs(c, w, 0))
    add("edited", "mid_epoch_ckpt_resumed_with_fewer_epochs",
        lambda c, w: mid_epoch_fewer_epochs(c, w, 1))
    add("edited", "summary_deleted_then_resume", summary_deleted)


def report_bad_metrics(ctx: Context, w: Path) -> dict:
    run = copy_run(ctx.get("done2"), w / "runs", "r")
    p = run / "metrics.jsonl"
    p.write_text(p.read_text().replace('"epoch": 1', '"epoch": "one"', 1))
    r = cli(["report", run, "--output", w / "rep.png"], w)
    return judge(r, "either")


# ======================================================================================================= hostile
def hostile_train(ctx: Context, w: Path, extra: dict | None = None, sets: tuple = (), *, expect: str = "refuse",
                  mem: bool = False, timeout: float = TIMEOUT, text: str | None = None, marker: Path | None = None,
                  victim: Path | None = None, check: Callable[[Path, Res], str | None] | None = None,
                  args: tuple = ()) -> dict:
    cfg = w / "run.yaml"
    if text is not None:
        cfg.write_text(text)
    else:
        write_cfg(cfg, run_cfg(w / "runs", "h", extra=extra))
    argv = ["train", cfg, *args]
    for s in sets:
        argv += ["--set", s]
    before = snap(victim) if victim else None
    r = cli(argv, w, timeout=timeout, mem=mem)
    lost = diff(before, snap(victim), f"{victim.name}") if victim else None
    wrong = check(w, r) if (check and r.rc == 0) else None
    return judge(r, expect, lost=lost, marker=marker, wrong=wrong)


def run_dir_module_system(ctx: Context, w: Path, command: list) -> dict:
    """A run directory whose saved config.yaml names `module:os:system` as its student, read back by a command."""
    marker = w / "PWNED"
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    edit_yaml(run / "config.yaml", lambda d: d.update(student={"name": "module:os:system",
                                                               "kwargs": {"command": f"touch {marker}"}}))
    argv = [a if a != "RUN" else run for a in command]
    r = cli(argv, w)
    # report only reads records: rc 0 is right for it as long as nothing runs
    return judge(r, "either" if command[0] == "report" else "refuse", marker=marker)


def alias_levels(levels: int, width: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\nstudent: {name: resnet8}\n"


def alias_chain(n: int) -> str:
    lines = ["c0: &c0 [x, x]"] + [f"c{i}: &c{i} [*c{i - 1}, *c{i - 1}]" for i in range(1, n // 2 + 1)]
    return "\n".join(lines) + "\nstudent: {name: resnet8}\n"


def pickle_file(path: Path, marker: Path, fmt: str) -> Path:
    import torch

    evil = Evil(f"touch {marker}")
    if fmt == "zip":
        torch.save({"model": {"stem.conv.weight": evil}}, path)
    elif fmt == "legacy":
        torch.save({"model": {"stem.conv.weight": evil}}, path, _use_new_zipfile_serialization=False)
    elif fmt == "ckpt":
        torch.save({"epoch": 1, "step": 0, "method": {"x": evil}, "run_id": None}, path)
    else:
        path.write_bytes(pickle.dumps({"model": evil}))
    return path


def kd_teacher_file(ctx: Context, w: Path, file: Path, *, mem: bool = False, timeout: float = TIMEOUT,
                    marker: Path | None = None, key: str = "teacher") -> dict:
    extra = {"method": {"name": "kd"}, "teacher": {"name": "resnet8", "checkpoint": str(file)}}
    if key == "student":
        extra = {"student": {"name": "resnet8", "checkpoint": str(file)}}
    return hostile_train(ctx, w, extra, mem=mem, timeout=timeout, marker=marker)


def convert_file(ctx: Context, w: Path, file: Path, *, mem: bool = False, marker: Path | None = None) -> dict:
    r = cli(["convert", file, w / "out.safetensors", "--model", "resnet8", "--num-classes", "10", "--in-channels",
             "1"], w, timeout=DOS_TIMEOUT if mem else TIMEOUT, mem=mem)
    return judge(r, "refuse", marker=marker)


def evil_run_ckpt(ctx: Context, w: Path, command: str) -> dict:
    marker = w / "PWNED"
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    pickle_file(run / "checkpoints" / "last.pt", marker, "ckpt")
    argv = (["train", "--resume", run, "--set", "train.epochs=2"] if command == "resume" else ["export", run])
    return judge(cli(argv, w), "refuse", marker=marker)


def configs_copy(ctx: Context, w: Path, name: str, dest: str | None) -> dict:
    r = cli(["configs", "copy", name, *([dest] if dest else [])], w)
    wrong = None
    if r.rc == 0:
        copied = [p for p in w.rglob("*") if p.is_file()]
        wrong = f"copied a file from outside the shipped configs: {[str(p.relative_to(w)) for p in copied][:3]}"
    return judge(r, "refuse", wrong=wrong)


def seed_true(ctx: Context, w: Path) -> dict:
    def check(w: Path, r: Res) -> str | None:
        text = (w / "runs" / "h" / "config.yaml").read_text() if (w / "runs" / "h" / "config.yaml").is_file() else ""
        m = re.search(r"^seed: (.*)$", text, re.M)
        return f"--set seed=true accepted silently as seed {m.group(1) if m else '?'}"
    return hostile_train(ctx, w, sets=("seed=true",), check=check)


def duplicate_keys(ctx: Context, w: Path) -> dict:
    body = json.dumps(run_cfg(w / "runs", "h"))[1:-1]
    text = "{" + body + ', "seed": 1, "seed": 2}\n'

    def check(w: Path, r: Res) -> str | None:
        saved = (w / "runs" / "h" / "config.yaml").read_text()
        m = re.search(r"^seed: (.*)$", saved, re.M)
        return f"duplicate key 'seed' (1, then 2) accepted silently; the run used seed {m.group(1) if m else '?'}"
    return hostile_train(ctx, w, text=text, check=check)


def duplicate_section(ctx: Context, w: Path) -> dict:
    text = (f"output_dir: {w / 'runs'}\nname: h\n"
            "data: {name: digits, val_size: 60, train_subset: 64, augment: {flip: false, crop_padding: 0}}\n"
            "student: {name: resnet8}\nmethod: {name: ce}\n"
            "train: {epochs: 1, batch_size: 32, progress: false}\n"
            "train: {epochs: 1, batch_size: 16}\n")

    def check(w: Path, r: Res) -> str | None:
        return "a second 'train:' section silently replaced the first (progress/batch_size of the first lost)"
    return hostile_train(ctx, w, text=text, check=check)


def sparse_convert(ctx: Context, w: Path) -> dict:
    return convert_file(ctx, w, sparse_safetensors(w / "sparse.safetensors"), mem=True)


def sparse_teacher(ctx: Context, w: Path) -> dict:
    return kd_teacher_file(ctx, w, sparse_safetensors(w / "sparse.safetensors"), mem=True, timeout=DOS_TIMEOUT)


def sparse_eval(ctx: Context, w: Path) -> dict:
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    sparse_safetensors(run / "student.safetensors")
    r = cli(["eval", run], w, timeout=DOS_TIMEOUT, mem=True)
    return judge(r, "refuse")


def throughput(ctx: Context, w: Path, args: list, mem: bool = False, expect: str = "refuse") -> dict:
    r = cli(["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--warmup", "1", "--steps", "1",
             "--repeats", "1", "--batch", "2", *args], w, timeout=DOS_TIMEOUT, mem=mem)
    return judge(r, expect)


def demo_seeds(ctx: Context, w: Path, seeds: str) -> dict:
    r = cli(["demo", "--seeds", seeds, "--output-dir", w / "demo"], w, timeout=25)
    if r.timed_out:
        return judge(None, "refuse", others=(), wrong=f"`demo --seeds {seeds}` started training (no refusal within "
                     "25 s; killed)") | {"commands": [r.display()], "seconds": round(r.seconds, 1)}
    return judge(r, "refuse")


def register_hostile() -> None:
    def marker_of(w):
        return w / "PWNED"

    add("hostile", "student_module_os_system_on_command_line",
        lambda c, w: hostile_train(c, w, {"student": {"name": "module:os:system",
                                                      "kwargs": {"command": f"touch {marker_of(w)}"}}},
                                   marker=marker_of(w)))
    add("hostile", "student_module_os_system_via_set",
        lambda c, w: hostile_train(c, w, sets=("student.name=module:os:system",
                                               f"student.kwargs={{command: 'touch {marker_of(w)}'}}"),
                                   marker=marker_of(w)))
    add("hostile", "teacher_module_os_system",
        lambda c, w: hostile_train(c, w, {"method": {"name": "kd"},
                                          "teacher": {"name": "module:os:system", "checkpoint": str(c.get("teacher")),
                                                      "kwargs": {"command": f"touch {marker_of(w)}"}}},
                                   marker=marker_of(w)))

    def rmtree_victim(c, w):
        victim = w / "victim"
        victim.mkdir()
        (victim / "precious.txt").write_text("keep me\n")
        return hostile_train(c, w, {"student": {"name": "module:shutil:rmtree", "kwargs": {"path": str(victim)}}},
                             victim=victim)
    add("hostile", "student_module_shutil_rmtree", rmtree_victim)
    for cmd in (["eval", "RUN"], ["export", "RUN"], ["train", "--resume", "RUN", "--set", "train.epochs=2"],
                ["report", "RUN", "--output", "rep.png"]):
        add("hostile", f"run_dir_config_module_os_system_{cmd[0]}{'_resume' if '--resume' in cmd else ''}",
            lambda c, w, cmd=cmd: run_dir_module_system(c, w, cmd))
    add("hostile", "student_module_torch_nn_identity",
        lambda c, w: hostile_train(c, w, {"student": {"name": "module:torch.nn:Identity"}}))
    add("hostile", "yaml_alias_bomb_9_levels_of_10",
        lambda c, w: hostile_train(c, w, text=alias_levels(9, 10), mem=True, timeout=DOS_TIMEOUT))
    add("hostile", "yaml_alias_chain_62_exponential",
        lambda c, w: hostile_train(c, w, text=alias_chain(62), mem=True, timeout=DOS_TIMEOUT))
    add("hostile", "yaml_alias_chain_62_via_set",
        lambda c, w: hostile_train(c, w, sets=("student.kwargs={" + ", ".join(
            ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [*a{i-1}, *a{i-1}]" for i in range(1, 31)]) + "}",),
            mem=True, timeout=DOS_TIMEOUT))
    add("hostile", "yaml_50000_nested_brackets",
        lambda c, w: hostile_train(c, w, text="student: " + "[" * 50000 + "]" * 50000 + "\n", mem=True,
                                   timeout=DOS_TIMEOUT))
    add("hostile", "yaml_50000_nested_brackets_via_set",
        lambda c, w: hostile_train(c, w, sets=("student.kwargs=" + "[" * 50000 + "]" * 50000,),
                                   mem=True, timeout=DOS_TIMEOUT))
    add("hostile", "yaml_duplicate_keys", duplicate_keys)
    add("hostile", "yaml_duplicate_section", duplicate_section)
    add("hostile", "config_is_dev_zero",
        lambda c, w: judge(cli(["train", "/dev/zero"], w, timeout=DOS_TIMEOUT, mem=True), "refuse"))
    add("hostile", "config_base_is_itself",
        lambda c, w: hostile_train(c, w, text="base: run.yaml\nstudent: {name: resnet8}\n", mem=True,
                                   timeout=DOS_TIMEOUT))
    add("hostile", "config_base_is_dev_zero",
        lambda c, w: hostile_train(c, w, text="base: /dev/zero\nstudent: {name: resnet8}\n", mem=True,
                                   timeout=DOS_TIMEOUT))
    add("hostile", "set_seed_true", seed_true)
    add("hostile", "set_student_kwargs_num_classes_5",
        lambda c, w: hostile_train(c, w, sets=("student.kwargs.num_classes=5",)))
    add("hostile", "set_student_kwargs_in_channels_3",
        lambda c, w: hostile_train(c, w, sets=("student.kwargs.in_channels=3",)))
    add("hostile", "configs_copy_etc_hostname", lambda c, w: configs_copy(c, w, "/etc/hostname", None))
    add("hostile", "configs_copy_etc_hostname_to_dest", lambda c, w: configs_copy(c, w, "/etc/hostname", "x.yaml"))
    add("hostile", "configs_copy_dotdot_escape",
        lambda c, w: configs_copy(c, w, "../" * 12 + "etc/hostname", "y.yaml"))
    add("hostile", "demo_seeds_0", lambda c, w: demo_seeds(c, w, "0"))
    add("hostile", "demo_seeds_minus_1", lambda c, w: demo_seeds(c, w, "-1"))
    add("hostile", "synthetic_image_shape_3x100000x100000",
        lambda c, w: hostile_train(c, w, {"data": {"name": "synthetic", "synthetic": {
            "image_shape": [3, 100000, 100000], "num_classes": 10, "train_size": 64, "test_size": 32}}},
            mem=True, timeout=DOS_TIMEOUT))
    add("hostile", "synthetic_image_shape_100000_channels",
        lambda c, w: hostile_train(c, w, {"data": {"name": "synthetic", "synthetic": {
            "image_shape": [100000, 8, 8], "num_classes": 10, "train_size": 64, "test_size": 32}}},
            mem=True, timeout=DOS_TIMEOUT))
    add("hostile", "synthetic_train_size_10e12",
        lambda c, w: hostile_train(c, w, {"data": {"name": "synthetic", "synthetic": {
            "image_shape": [3, 32, 32], "num_classes": 10, "train_size": 10 ** 12, "test_size": 32}}},
            mem=True, timeout=DOS_TIMEOUT))
    add("hostile", "augment_crop_padding_10e6",
        lambda c, w: hostile_train(c, w, {"data": {"augment": {"crop_padding": 10 ** 6}}}, mem=True,
                                   timeout=DOS_TIMEOUT))
    add("hostile", "augment_crop_padding_negative",
        lambda c, w: hostile_train(c, w, {"data": {"augment": {"crop_padding": -3}}}))
    add("hostile", "bench_throughput_device_gpu", lambda c, w: throughput(c, w, ["--device", "gpu"]))
    add("hostile", "bench_throughput_device_cuda_99", lambda c, w: throughput(c, w, ["--device", "cuda:99"]))
    add("hostile", "bench_throughput_input_3x99999x99999",
        lambda c, w: throughput(c, w, ["--input", "3x99999x99999"], mem=True))
    add("hostile", "bench_throughput_input_garbage", lambda c, w: throughput(c, w, ["--input", "3xfoo"]))
    add("hostile", "bench_throughput_batch_10e9",
        lambda c, w: throughput(c, w, ["--batch", str(10 ** 9)], mem=True))
    add("hostile", "sparse_32GiB_safetensors_as_teacher", sparse_teacher)
    add("hostile", "sparse_32GiB_safetensors_convert", sparse_convert)
    add("hostile", "sparse_32GiB_safetensors_as_run_student_eval", sparse_eval)
    headers = {
        "header_length_2_63": (b"{}", 2 ** 63 - 1, b""),
        "header_length_beyond_file": (b'{"a": 1}', 4096, b""),
        "header_not_json": (b"{{{{not json" + b" " * 4, None, b""),
        "header_json_list": (b"[1, 2, 3]" + b" " * 7, None, b""),
        "offsets_beyond_file": (json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}})
                                .encode(), None, b"\0" * 16),
        "unknown_dtype": (json.dumps({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}).encode(), None,
                          b"\0" * 16),
        "shape_offsets_mismatch": (json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 16]}})
                                   .encode(), None, b"\0" * 16),
        "negative_shape": (json.dumps({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}).encode(),
                           None, b"\0" * 16),
        "empty_file": None,
    }
    for name, spec in headers.items():
        def mk(c, w, spec=spec):
            path = w / "bad.safetensors"
            if spec is None:
                path.write_bytes(b"")
            else:
                raw_safetensors(path, spec[0], spec[1], spec[2])
            return convert_file(c, w, path, mem=True)
        add("hostile", f"safetensors_{name}_convert", mk)

    def bad_teacher(c, w):
        path = raw_safetensors(w / "bad.safetensors", b'{"a": 1}', 4096)
        return kd_teacher_file(c, w, path, mem=True, timeout=DOS_TIMEOUT)
    add("hostile", "safetensors_header_beyond_file_as_teacher", bad_teacher)
    for fmt in ("zip", "legacy", "raw"):
        add("hostile", f"pickle_reduce_{fmt}_as_teacher",
            lambda c, w, fmt=fmt: kd_teacher_file(c, w, pickle_file(w / "evil.pt", marker_of(w), fmt),
                                                  marker=marker_of(w)))
    add("hostile", "pickle_reduce_as_student_checkpoint",
        lambda c, w: kd_teacher_file(c, w, pickle_file(w / "evil.pth", marker_of(w), "zip"), marker=marker_of(w),
                                     key="student"))
    add("hostile", "pickle_reduce_convert",
        lambda c, w: convert_file(c, w, pickle_file(w / "evil.pt", marker_of(w), "zip"), marker=marker_of(w)))
    add("hostile", "pickle_reduce_as_run_checkpoint_resume", lambda c, w: evil_run_ckpt(c, w, "resume"))
    add("hostile", "pickle_reduce_as_run_checkpoint_export", lambda c, w: evil_run_ckpt(c, w, "export"))
    add("hostile", "teacher_checkpoint_dev_zero",
        lambda c, w: kd_teacher_file(c, w, Path("/dev/zero"), mem=True, timeout=DOS_TIMEOUT))


# ======================================================================================================= overwrites
def export_onto(ctx: Context, w: Path, target: str, fmt: str = "safetensors") -> dict:
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    other = copy_run(ctx.get("done2"), w / "runs", "o")
    unrelated = w / "notes.txt"
    unrelated.write_text("a user's file\n")
    link = w / "link.safetensors"
    link.symlink_to(other / "student.safetensors")
    out = {"other_student": other / "student.safetensors", "own_checkpoint": run / "checkpoints" / "last.pt",
           "own_config": run / "config.yaml", "unrelated_file": unrelated, "own_student": run / "student.safetensors",
           "symlink_to_other_student": link}[target]
    protect = [run, other, unrelated]
    before = [snap(p) for p in protect]
    r = cli(["export", run, "--output", out, "--format", fmt], w)
    lost = None
    for p, b in zip(protect, before, strict=True):
        lost = lost or diff(b, snap(p), str(p.relative_to(w)))
    if lost and r.rc == 0 and target == "own_student" and lost.endswith("changed: student.safetensors") \
            and same_student(run / "student.safetensors", ctx.get("done1") / "student.safetensors"):
        return judge(r, "refuse", wrong="replaced the run's own student.safetensors (same weights, other bytes: a "
                     "teacher.sha256 pinned to that file no longer matches)")
    if lost and r.rc == 0:
        lost += " (export wrote over an existing file without --force; convert and bench throughput refuse that)"
    return judge(r, "refuse", lost=lost)


def force_late_invalid(ctx: Context, w: Path, template: str, sets: tuple, dfa: bool = False) -> dict:
    name = "dfa" if dfa else "r"
    run = copy_run(ctx.get(template), w / "runs", name)
    cfg = write_cfg(w / "new.yaml", ctx.dfa_cfg(w / "runs") if dfa else run_cfg(w / "runs", "r"))
    before = snap(run)
    argv = ["train", cfg, "--force"]
    for s in sets:
        argv += ["--set", s]
    r = cli(argv, w)
    lost = diff(before, snap(run), "the old run") if r.rc != 0 else None
    if lost and not run.exists():
        lost = "the old run directory was deleted, then the new config failed"
    return judge(r, "refuse", lost=lost)


def nan_teacher(ctx: Context, w: Path) -> Path:
    """The resnet14 teacher's weights with one NaN."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(ctx.get("teacher") / "student.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(w / "nan_teacher.safetensors"))
    return w / "nan_teacher.safetensors"


def report_onto(ctx: Context, w: Path, target: str) -> dict:
    run = copy_run(ctx.get("done1"), w / "runs", "r")
    other = copy_run(ctx.get("done2"), w / "runs", "o")
    unrelated = w / "figure.png"
    unrelated.write_bytes(b"\x89PNG\r\n\x1a\n a figure the user made\n")
    out = {"unrelated_png": unrelated, "own_config": run / "config.yaml",
           "other_student": other / "student.safetensors"}[target]
    protect = [run, other, unrelated]
    before = [snap(p) for p in protect]
    r = cli(["report", run, "--output", out], w)
    lost = None
    for p, b in zip(protect, before, strict=True):
        lost = lost or diff(b, snap(p), str(p.relative_to(w)))
    if lost and target == "unrelated_png":
        lost += " (report --output replaced an existing file without --force)"
    return judge(r, "refuse", lost=lost)


def convert_onto(ctx: Context, w: Path) -> dict:
    other = copy_run(ctx.get("done2"), w / "runs", "o")
    before = snap(other)
    r = cli(["convert", ctx.get("done1"), other / "student.safetensors", "--model", "resnet8", "--num-classes", "10",
             "--in-channels", "1"], w)
    return judge(r, "refuse", lost=diff(before, snap(other), "the other run"))


def force_on_non_run(ctx: Context, w: Path, how: str) -> dict:
    victim = w / "runs" / "r"
    if how == "plain_dir":
        victim.mkdir(parents=True)
        (victim / "thesis.tex").write_text("years of work\n")
        protect = victim
    else:  # a symbolic link to a real run elsewhere
        real = copy_run(ctx.get("done1"), w / "elsewhere", "r")
        (w / "runs").mkdir()
        victim.symlink_to(real)
        protect = real
    cfg = write_cfg(w / "r.yaml", run_cfg(w / "runs", "r"))
    before = snap(protect)
    r = cli(["train", cfg, "--force"], w)
    return judge(r, "refuse", lost=diff(before, snap(protect), "the directory in the way"))


def name_escape(ctx: Context, w: Path, name: str) -> dict:
    victim = copy_run(ctx.get("done1"), w, "victim")
    cfg = write_cfg(w / "r.yaml", run_cfg(w / "runs", name))
    (w / "runs").mkdir()
    before = snap(victim)
    r = cli(["train", cfg, "--force"], w)
    return judge(r, "refuse", lost=diff(before, snap(victim), "the victim run outside output_dir"))


def throughput_onto(ctx: Context, w: Path) -> dict:
    out = w / "results.json"
    out.write_text('{"precious": true}\n')
    before = snap(out)
    r = cli(["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--output", out, "--batch", "2",
             "--warmup", "1", "--steps", "1", "--repeats", "1"], w)
    return judge(r, "refuse", lost=diff(before, snap(out), "results.json"))


def configs_copy_onto(ctx: Context, w: Path) -> dict:
    out = w / "mine.yaml"
    out.write_text("my config\n")
    before = snap(out)
    r = cli(["configs", "copy", "digits/kd.yaml", out], w)
    return judge(r, "refuse", lost=diff(before, snap(out), "mine.yaml"))


def register_overwrites() -> None:
    for target in ("other_student", "own_checkpoint", "own_config", "unrelated_file", "own_student",
                   "symlink_to_other_student"):
        add("overwrites", f"export_output_onto_{target}", lambda c, w, t=target: export_onto(c, w, t))
    add("overwrites", "export_onnx_onto_unrelated_file", lambda c, w: export_onto(c, w, "unrelated_file", "onnx"))
    add("overwrites", "export_onnx_onto_own_checkpoint", lambda c, w: export_onto(c, w, "own_checkpoint", "onnx"))
    add("overwrites", "force_batch_size_above_subset",
        lambda c, w: force_late_invalid(c, w, "done1", ("train.batch_size=5000",)))
    add("overwrites", "force_val_size_too_large",
        lambda c, w: force_late_invalid(c, w, "done1", ("data.val_size=1400",)))
    add("overwrites", "force_teacher_architecture_mismatch",
        lambda c, w: force_late_invalid(c, w, "done1", ("method.name=kd", "teacher.name=resnet20",
                                                         f"teacher.checkpoint={c.get('teacher')}")))
    add("overwrites", "force_dfa_batch_size_above_subset",
        lambda c, w: force_late_invalid(c, w, "dfa", ("train.batch_size=5000",), dfa=True))
    add("overwrites", "force_dfa_batch_size_above_search_half",
        lambda c, w: force_late_invalid(c, w, "dfa", ("train.batch_size=48",), dfa=True))
    add("overwrites", "force_dfa_teacher_missing_file",
        lambda c, w: force_late_invalid(c, w, "dfa", (f"teacher.checkpoint={w / 'nope.safetensors'}",), dfa=True))
    add("overwrites", "force_teacher_sha256_mismatch",
        lambda c, w: force_late_invalid(c, w, "done1", ("method.name=kd", "teacher.name=resnet14",
                                                         f"teacher.checkpoint={c.get('teacher')}",
                                                         "teacher.sha256=" + "ab" * 32)))
    add("overwrites", "force_teacher_with_nan_weights",
        lambda c, w: force_late_invalid(c, w, "done1", ("method.name=kd", "teacher.name=resnet14",
                                                         f"teacher.checkpoint={nan_teacher(c, w)}")))
    add("overwrites", "force_dfa_teacher_sha256_mismatch",
        lambda c, w: force_late_invalid(c, w, "dfa", ("teacher.sha256=" + "ab" * 32,), dfa=True))
    add("overwrites", "force_dfa_teacher_with_nan_weights",
        lambda c, w: force_late_invalid(c, w, "dfa", (f"teacher.checkpoint={nan_teacher(c, w)}",), dfa=True))
    for target in ("unrelated_png", "own_config", "other_student"):
        add("overwrites", f"report_output_onto_{target}", lambda c, w, t=target: report_onto(c, w, t))
    add("overwrites", "convert_onto_other_runs_student", convert_onto)
    add("overwrites", "force_on_plain_directory", lambda c, w: force_on_non_run(c, w, "plain_dir"))
    add("overwrites", "force_on_symlink_to_run", lambda c, w: force_on_non_run(c, w, "symlink"))
    add("overwrites", "force_name_dotdot", lambda c, w: name_escape(c, w, ".."))
    add("overwrites", "force_name_dotdot_victim", lambda c, w: name_escape(c, w, "../victim"))
    add("overwrites", "bench_throughput_output_existing", throughput_onto)
    add("overwrites", "configs_copy_onto_existing_file", configs_copy_onto)


# ======================================================================================================= disks
class Disk:
    """A small filesystem mounted at `path`: tmpfs, else a loop-mounted ext4 image, else chmod (not as root)."""

    def __init__(self, path: Path, size_kb: int) -> None:
        self.path, self.size_kb, self.kind = path, size_kb, None
        path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Disk:
        if os.geteuid() == 0:
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k", "tmpfs", str(self.path)],
                              capture_output=True).returncode == 0:
                self.kind = "tmpfs"
            elif shutil.which("mkfs.ext4"):
                img = self.path.with_suffix(".img")
                subprocess.run(["truncate", "-s", f"{self.size_kb}k", str(img)], check=False)
                if (subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True).returncode == 0 and
                        subprocess.run(["mount", "-o", "loop", str(img), str(self.path)],
                                       capture_output=True).returncode == 0):
                    self.kind = "loop"
        else:
            self.kind = "chmod"
        return self

    def read_only(self) -> bool:
        if self.kind in ("tmpfs", "loop"):
            return subprocess.run(["mount", "-o", "remount,ro", str(self.path)], capture_output=True).returncode == 0
        if self.kind == "chmod":
            for p in [self.path, *self.path.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            return True
        return False

    def writable(self) -> None:
        if self.kind in ("tmpfs", "loop"):
            subprocess.run(["mount", "-o", "remount,rw", str(self.path)], capture_output=True)
        elif self.kind == "chmod":
            for p in [self.path, *self.path.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)

    def fill(self, leave: int) -> bool:
        """Leave about `leave` bytes free (full disk); only on a real small filesystem."""
        if self.kind not in ("tmpfs", "loop"):
            return False
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        with open(self.path / "filler", "wb") as f:
            try:
                f.write(b"\0" * max(0, free - leave))
                f.flush()
            except OSError:
                pass
        return True

    def unfill(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self.kind in ("tmpfs", "loop"):
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        elif self.kind == "chmod":
            self.writable()


def disk_attempt(ctx: Context, w: Path, mode: str, action: str) -> dict:
    """mode: 'ro' or 'full'. The run lives on the small filesystem; the command must fail with one line, lose
    nothing, and (for resume) succeed once the disk is writable again with the result of an undisturbed resume."""
    template = ctx.get("done1")
    with Disk(w / "disk", 4096) as disk:
        if disk.kind is None:
            return skipped("cannot simulate: not allowed to mount tmpfs or a loop filesystem as root (chmod does "
                           "not stop root)")
        if mode == "full" and disk.kind == "chmod":
            return skipped("cannot simulate a full disk without mounting a small filesystem (not root)")
        run = copy_run(template, disk.path / "runs", "r")
        cfg = write_cfg(w / "r.yaml", run_cfg(disk.path / "runs", "r"))
        newcfg = write_cfg(w / "n.yaml", run_cfg(disk.path / "runs", "n"))
        if mode == "ro":
            if not disk.read_only():
                return skipped(f"cannot simulate: remount read-only failed ({disk.kind})")
        else:
            disk.fill(leave=24 * 1024)
        before = snap(run)
        argv = {"resume": ["train", "--resume", run, "--set", "train.epochs=2"],
                "force": ["train", cfg, "--force"],
                "new_run": ["train", newcfg],
                "export": ["export", run],
                "export_onnx": ["export", run, "--format", "onnx"],
                "report": ["report", run, "--output", disk.path / "report.png"],
                "convert": ["convert", run, disk.path / "c.safetensors", "--model", "resnet8", "--num-classes", "10",
                            "--in-channels", "1"]}[action]
        r = cli(argv, w)
        after = snap(run)
        leftovers = [p.name for p in disk.path.rglob(".*.tmp")]
        checks = {"filesystem": disk.kind, "tmp_leftovers": leftovers}
        lost = None
        if action == "force" and mode == "full" and r.rc == 0:
            lost = None if metric_epochs(run) == [1] else f"metrics after --force: {metric_epochs(run)}"
        elif action == "resume" and r.rc != 0:
            state, why = ckpt_state(run)
            lost = why or (None if state == (1, 0) else f"checkpoint now at {state}, not epoch 1")
            old_cfg, new_cfg = config_but_epochs(before["config.yaml"]), config_but_epochs(after.get("config.yaml"))
            if not lost and old_cfg != new_cfg:
                keys = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k)) \
                    if isinstance(old_cfg, dict) and isinstance(new_cfg, dict) else ["(unreadable)"]
                lost = f"config.yaml changed in {keys} (beyond epochs, name and output_dir, which a resume may change)"
        elif action != "resume" and r.rc != 0:
            lost = diff(before, after, "the run")
        others = []
        wrong = None
        if action == "resume" and r.rc != 0 and not lost:
            disk.writable() if mode == "ro" else disk.unfill()
            again = cli(["train", "--resume", run, "--set", "train.epochs=2"], w)
            others = [r]
            if again.rc != 0:
                wrong = f"the resume failed again once the disk was writable: {again.first_err()}"
            elif not same_student(run / "student.safetensors", ctx.get("done2") / "student.safetensors"):
                wrong = "after the failed write, the resumed student differs from an undisturbed resume's"
            elif metric_epochs(run) != [1, 2]:
                lost = f"metrics epochs {metric_epochs(run)} after the retry"
            v = judge(again, "succeed", others=tuple(others), lost=lost, wrong=wrong, checks=checks,
                      note=f"refused with one line ({r.first_err(90)}); resumed exactly once writable")
            if v["outcome"] == "ok" and not r.one_line:
                v.update(outcome="unclear", reason=f"error is not one line: {r.first_err()}")
            if v["outcome"] == "ok" and leftovers:
                v.update(outcome="unclear", reason=f"temporary files left behind: {leftovers}")
            return v
        if r.rc != 0 and leftovers and not lost:
            wrong = f"temporary files left behind: {leftovers}"
        expect = "either" if (mode == "full" and action == "force") else "refuse"
        return judge(r, expect, lost=lost, wrong=wrong, checks=checks)


def config_but_epochs(text: bytes | None) -> Any:
    import yaml

    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
        data.get("train", {}).pop("epochs", None)
        for key in ("name", "output_dir"):  # a copied run is resumed where it now is
            data.pop(key, None)
        return data
    except Exception:  # unreadable: compare the bytes
        return text


def register_disks() -> None:
    for mode in ("ro", "full"):
        for action in ("resume", "force", "new_run", "export", "export_onnx", "report", "convert"):
            add("disks", f"{mode}_{action}", lambda c, w, m=mode, a=action: disk_attempt(c, w, m, a))


# ======================================================================================================= runner
def run_one(ctx: Context, a: Attempt, base: Path) -> dict:
    w = base / a.category / a.name
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        v = a.fn(ctx, w)
    except Exception as exc:  # a failure of the audit itself is never "ok"
        v = {"commands": [], "rc": None, "traceback": False, "one_line_error": None, "checks": {},
             "outcome": "unclear", "reason": f"audit error: {type(exc).__name__}: {str(exc)[:300]}",
             "audit_traceback": traceback.format_exc()[-2000:]}
    v["wall_s"] = round(time.monotonic() - t0, 1)
    return {"category": a.category, "name": a.name, **v}


def main(argv: list[str] | None = None) -> int:
    global BASE_DIR
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=CATEGORIES, help="run one category")
    p.add_argument("--output", type=Path, default=Path("/tmp/adversarial.json"), help="JSON of every attempt")
    p.add_argument("--jobs", type=int, default=2, help="attempts in parallel (races always run one at a time)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--list", action="store_true", help="list the attempts and exit")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    register_kills(rng)
    register_races()
    register_edited()
    register_hostile()
    register_overwrites()
    register_disks()
    todo = [a for a in ATTEMPTS if args.only in (None, a.category)]
    if args.list:
        for a in todo:
            print(f"{a.category:11s} {a.name}")
        return 0
    base = Path(tempfile.mkdtemp(prefix="distillab-adv-"))
    BASE_DIR = base
    ctx = Context(base)
    started = time.monotonic()
    results: list[dict] = []
    print(f"distillab adversarial audit: {len(todo)} attempts, python {PY}, work dir {base}", flush=True)
    try:
        for cat in CATEGORIES:
            batch = [a for a in todo if a.category == cat]
            if not batch:
                continue
            jobs = 1 if cat == "races" else max(1, args.jobs)  # races time their own overlaps
            t0 = time.monotonic()
            with ThreadPoolExecutor(jobs) as pool:
                for res in pool.map(lambda a: run_one(ctx, a, base), batch):
                    results.append(res)
                    mark = "" if res["outcome"] == "ok" else f"  <- {res['reason'][:110]}"
                    print(f"  [{cat}] {res['name']}: {res['outcome']} ({res['wall_s']} s){mark}", flush=True)
            print(f"{cat}: {len(batch)} attempts in {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        elapsed = time.monotonic() - started
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"elapsed_s": round(elapsed, 1), "python": PY, "seed": args.seed,
                                           "mem_limit_bytes": MEM_LIMIT, "attempts": results}, indent=1) + "\n")
        if not args.keep:
            for d in sorted(base.rglob("disk"), reverse=True):  # never rmtree into a mount left behind
                subprocess.run(["umount", "-l", str(d)], capture_output=True)
            shutil.rmtree(base, ignore_errors=True)
    print_table(results, elapsed, args.output)
    return 0


def print_table(results: list[dict], elapsed: float, output: Path) -> None:
    cols = OUTCOMES
    head = f"{'category':11s} {'attempts':>8s} " + " ".join(f"{c:>{max(len(c), 4)}s}" for c in cols)
    print("\n" + head + "\n" + "-" * len(head))
    for cat in [*CATEGORIES, "total"]:
        rows = results if cat == "total" else [r for r in results if r["category"] == cat]
        if not rows:
            continue
        counts = " ".join(f"{sum(r['outcome'] == c for r in rows):>{max(len(c), 4)}d}" for c in cols)
        print(f"{cat:11s} {len(rows):>8d} {counts}")
    bad = [r for r in results if r["outcome"] != "ok"]
    print(f"\nnon-ok attempts ({len(bad)}):")
    for r in bad:
        print(f"  {r['outcome']:17s} {r['category']}/{r['name']}: {r['reason']}")
    print(f"\n{len(results)} attempts in {elapsed:.0f} s; every attempt in {output}")


if __name__ == "__main__":
    sys.exit(main())
