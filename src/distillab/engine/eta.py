"""How long a run has left: the epochs timed so far, projected over the epochs and evaluations still to come.

An epoch costs its training (the record's `epoch_time_s`) plus what follows it before the next one starts (its
evaluation when it has one, the run's files, callbacks). Epochs with and without an evaluation are timed apart, so
that with `train.eval_every` > 1 an evaluation's cost is counted only for the epochs that will evaluate.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def format_duration(seconds: float) -> str:
    """`4m12s`, `1h03m`, `12s` (rounded to the second; hours and minutes past an hour)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def evaluates(epoch: int, epochs: int, eval_every: int) -> bool:
    """Whether epoch `epoch` (counted from 1) ends with an evaluation, as the trainer decides."""
    return epoch % eval_every == 0 or epoch == epochs


def evaluations_left(done: int, epochs: int, eval_every: int) -> int:
    """Evaluations in epochs done+1 .. epochs: every `eval_every`-th epoch, and the last."""
    if done >= epochs:
        return 0
    return epochs // eval_every - done // eval_every + (epochs % eval_every != 0)


def run_eta(done: int, epochs: int, eval_every: int, epoch_s: float, eval_s: float) -> float:
    """Seconds left after `done` of `epochs` epochs, when an epoch without evaluation takes `epoch_s` and an
    evaluation adds `eval_s`."""
    return max(0, epochs - done) * epoch_s + evaluations_left(done, epochs, eval_every) * eval_s


class RunClock:
    """Times the epochs of one fit (from `start`) and predicts the time its run has left."""

    def __init__(self, epochs: int, eval_every: int = 1) -> None:
        self.epochs, self.eval_every = epochs, eval_every
        self.train: list[float] = []  # each epoch's training seconds
        self.after: dict[bool, list[float]] = {True: [], False: []}  # seconds after training, with/without eval
        self.mark: float | None = None

    def start(self) -> None:
        self.mark = time.perf_counter()

    def epoch_done(self, record: dict[str, Any], now: float | None = None) -> None:
        """Count the epoch of `record` (its `epoch_time_s`, whether it evaluated), which ended `now`."""
        now = time.perf_counter() if now is None else now
        train = float(record.get("epoch_time_s", 0.0))
        if self.mark is not None:
            self.train.append(train)
            evaluated = "test_acc" in record or "val_acc" in record
            self.after[evaluated].append(max(0.0, now - self.mark - train))  # resumed mid-epoch: train > wall
        self.mark = now

    def costs(self) -> tuple[float, float] | None:
        """(seconds of an epoch without evaluation, seconds an evaluation adds), or None before an epoch ends."""
        if not self.train:
            return None
        plain = statistics.mean(self.after[False]) if self.after[False] else 0.0
        evaluated = statistics.mean(self.after[True]) if self.after[True] else plain
        return statistics.mean(self.train) + plain, max(0.0, evaluated - plain)

    def left(self, done: int) -> float | None:
        """Seconds left after `done` epochs; None before an epoch has been timed."""
        costs = self.costs()
        return None if costs is None else run_eta(done, self.epochs, self.eval_every, *costs)

    def left_during(self, epoch: int, fraction: float, elapsed: float) -> float | None:
        """Seconds left while epoch `epoch` (counted from 0) is `fraction` trained after `elapsed` seconds of it;
        before an epoch has been timed, a whole epoch is taken to train at this one's pace."""
        if fraction <= 0:
            return None
        train_s = statistics.mean(self.train) if self.train else elapsed / fraction
        epoch_s, eval_s = self.costs() or (train_s, 0.0)
        return max(0.0, run_eta(epoch, self.epochs, self.eval_every, epoch_s, eval_s) - fraction * train_s)
