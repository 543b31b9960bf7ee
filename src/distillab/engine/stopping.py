"""Stopping a run cleanly: SIGTERM / SIGINT ask the loop to stop at the next step (a checkpoint is written); a
second SIGINT interrupts at once."""

from __future__ import annotations

import signal
import threading

import torch

from distillab.engine.distributed import World, broadcast_flag
from distillab.errors import DistillabError


class TrainingStopped(DistillabError):
    """SIGTERM or SIGINT stopped the run after writing a checkpoint it can be resumed from."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While entered (in the main thread), SIGTERM and SIGINT set `signum` instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _request(self, signum: int, _frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def stop_now(self, step: int, refresh: int, world: World, device: torch.device) -> bool:
        """Whether to stop after `step`; ranks agree at the refresh points (a collective, so not every step)."""
        if not world.distributed:
            return self.signum is not None
        if (step + 1) % refresh:
            return False
        return broadcast_flag(self.signum is not None, world, device)

    def stopped(self, epoch: int, step: int, where: str) -> TrainingStopped:
        signum = self.signum or signal.SIGTERM
        return TrainingStopped(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {step}: "
                               f"{where}", signum)
