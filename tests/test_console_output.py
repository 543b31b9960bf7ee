"""What the command line prints: whole plain lines into files and pipes, the run's ETA, `[k/N]` markers, and a
quiet end when the reader of a pipe goes away."""

import fcntl
import os
import re
import subprocess
import sys

import pytest

from conftest import shrink_demo, tiny_config
from distillab import methods
from distillab.cli import CLOSED_PIPE, main
from distillab.engine.eta import RunClock, evaluates, evaluations_left, format_duration, run_eta

LONG_NAME = "a_run_whose_name_is_long_enough_that_the_done_line_passes_eighty_columns"


def _env() -> dict[str, str]:
    """The environment without anything that would make rich treat a pipe as a terminal or fix its width."""
    return {k: v for k, v in os.environ.items()
            if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillab", *args], capture_output=True, stdin=subprocess.DEVNULL,
                          env=_env(), text=True, timeout=300)


def test_piped_output_is_plain_whole_lines_with_tables_in_full(tmp_path):
    config = tiny_config(tmp_path, LONG_NAME, "train.epochs=2")
    proc = _cli("train", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    done = [line for line in lines if line.startswith("done: ")]
    assert done == [done[0]] and done[0].endswith(f"-> {tmp_path / 'runs' / LONG_NAME}") and len(done[0]) > 80
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(len(line) > 80 for line in epochs)
    # the run's time left on every epoch line but the last
    assert re.fullmatch(r"epoch 1/2 loss .* img/s eta (\d+m)?\d+s", epochs[0]), epochs[0]
    assert re.fullmatch(r"epoch 2/2 loss .* test \d+\.\d\d% lr \S+ [\d,]+ img/s", epochs[1]), epochs[1]

    proc = _cli("methods")
    assert proc.returncode == 0 and "\x1b" not in proc.stdout
    cls = methods.get("crd")
    options = ", ".join(f"{k}={f.default}" for k, f in cls.Options.model_fields.items())
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
    row = [line for line in proc.stdout.splitlines() if line.startswith("│ crd ")]
    assert len(row) == 1 and doc in row[0] and options in row[0] and len(row[0]) > 80  # one row, nothing cut
    assert proc.stdout.splitlines()[0] == "distillab methods"  # the title on a line of its own


def test_time_left_is_formatted_in_seconds_minutes_and_hours():
    assert [format_duration(s) for s in (0, 0.4, 12.4, 59.6, 60, 252, 3599, 3600, 3725, 100 * 3600 + 61)] == [
        "0s", "0s", "12s", "1m00s", "1m00s", "4m12s", "59m59s", "1h00m", "1h02m", "100h01m"]
    assert format_duration(-3) == "0s"


def test_evaluations_left_counts_the_epochs_the_trainer_evaluates():
    for epochs in range(1, 13):
        for every in range(1, 6):
            for done in range(epochs + 1):
                by_hand = sum(1 for e in range(done + 1, epochs + 1) if e % every == 0 or e == epochs)
                assert evaluations_left(done, epochs, every) == by_hand
    assert evaluates(6, 7, 3) and evaluates(7, 7, 3) and not evaluates(5, 7, 3)


def test_run_eta_projects_the_timed_epochs_over_those_left():
    # 7 epochs, evaluation every 3rd and at the last; 3 done: epochs 4, 5 (10 s each), 6 and 7 (10 + 4 s each)
    assert run_eta(3, 7, 3, epoch_s=10.0, eval_s=4.0) == 4 * 10 + 2 * 4
    assert run_eta(7, 7, 3, 10.0, 4.0) == 0
    clock = RunClock(7, eval_every=3)
    clock.mark = 0.0
    clock.epoch_done({"epoch": 1, "epoch_time_s": 10.0}, now=10.5)  # 0.5 s of files after training
    clock.epoch_done({"epoch": 2, "epoch_time_s": 12.0}, now=23.0)  # 0.5 s again
    clock.epoch_done({"epoch": 3, "epoch_time_s": 11.0, "test_acc": 50.0}, now=37.5)  # evaluated: 3.5 s after
    # an epoch without evaluation: 11 s of training + 0.5 s; an evaluation adds 3.5 - 0.5 = 3 s
    assert clock.costs() == pytest.approx((11.5, 3.0))
    assert clock.left(3) == pytest.approx(11.5 + 11.5 + 14.5 + 14.5)  # epochs 4, 5, 6 (eval), 7 (eval)
    # half-way through epoch 4 (index 3): half of its 11 s of training done
    assert clock.left_during(3, 0.5, elapsed=5.0) == pytest.approx(52.0 - 5.5)
    fresh = RunClock(4)
    assert fresh.left(0) is None and fresh.left_during(0, 0.0, 0.0) is None
    # before any epoch has ended, the first epoch's pace: a quarter in 5 s -> 20 s an epoch, 75 s left
    assert fresh.left_during(0, 0.25, elapsed=5.0) == pytest.approx(75.0)


def test_demo_numbers_its_runs(tmp_path, monkeypatch, capsys):
    shrink_demo(monkeypatch)
    argv = ["demo", "--output-dir", str(tmp_path / "demo"), "--seeds", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    numbered = [line for line in lines if line.startswith("[")]
    assert [line.split(":")[0] for line in numbered] == ["[1/4] teacher", "[2/4] ce_s0", "[3/4] kd_s0",
                                                         "[4/4] fitnet_s0"]
    assert main(argv) == 0  # finished runs are reused, and still counted
    numbered = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(numbered) == 4 and numbered[3].startswith("[4/4] fitnet_s0: resnet8 fitnet, test ")
    assert all(line.endswith("reused") for line in numbered)


def _closed_early(args: list[str], read_line: bool) -> tuple[int, bytes, bytes]:
    """Run the command into a pipe of one page, read its first line (or nothing), then close the pipe; returns
    the exit status, the line read and stderr. Output longer than the pipe holds blocks the command until the
    pipe closes, so the command meets the closed pipe whatever the timing."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "distillab", *args], stdout=w, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=_env())
    os.close(w)
    line = b""
    while read_line and not line.endswith(b"\n"):
        byte = os.read(r, 1)  # unbuffered: what the command writes after this line stays in the pipe
        if not byte:
            break
        line += byte
    os.close(r)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, line, err


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux's F_SETPIPE_SZ")
@pytest.mark.parametrize(("args", "first"), [(["configs", "list"], b"configs/"),
                                             (["methods"], b"distillab methods\n")])
def test_a_pipe_closed_after_one_line_ends_quietly(args, first):
    code, line, err = _closed_early(args, read_line=True)
    assert line.startswith(first)
    assert err == b"" and code == CLOSED_PIPE == 141  # no traceback, no message: 128 + SIGPIPE


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux's F_SETPIPE_SZ")
def test_a_pipe_closed_before_any_output_ends_quietly():
    code, _, err = _closed_early(["models"], read_line=False)
    assert err == b"" and code == CLOSED_PIPE
