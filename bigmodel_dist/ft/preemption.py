"""Stop requests (signals, a launcher's stop file, the job's time limit) turned into one agreed stop step.

A stop may be asked for at any moment, from the first line of the process on: `StopSignals` is
installed before any heavy import and only records what arrived. A signal may reach any subset of
ranks, and the time limit is judged by rank 0's clock, so every step all ranks all-reduce (MAX) one
small flag (`StopController.agreed_stop`): they stop after the same step, save one checkpoint together
and exit with the requeue code. Torch is imported only by the controller, which needs a process group.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from bigmodel_dist.config.schema import CheckpointConfig

log = logging.getLogger(__name__)

# Watched from a process's first line, before its config is read: the config's own default.
DEFAULT_STOP_SIGNALS = tuple(CheckpointConfig().stop_signals)
NO_STOP, SIGNALLED, TIME_LIMIT, WRITE_FAILED = 0, 1, 2, 3  # MAX wins: a failure outranks a stop
REASONS = {SIGNALLED: "signal", TIME_LIMIT: "time limit", WRITE_FAILED: "checkpoint write failed"}
FAILED_WRITE = REASONS[WRITE_FAILED]


class StopSignals:
    """Remembers the first stop signal (or a launcher's stop file); acting on it is left to the loop.

    The handler only records, so a signal in the middle of an import, a collective or a save is safe.
    `stop_file`: a path a launcher creates instead of signalling its workers (a worker can be signalled
    before it installed a handler; a file is seen whenever the worker looks).
    """

    def __init__(self, signal_names: tuple[str, ...] | list[str] = DEFAULT_STOP_SIGNALS, stop_file: str | None = None,
                 on_signal: Callable[[], None] | None = None):
        self._received: str | None = None
        self._stop_file = stop_file
        self._on_signal_hook = on_signal  # e.g. a launcher passing the request on to its workers
        self._previous: dict[int, Any] = {}  # signal -> the handler before ours
        self.watch(signal_names)

    def watch(self, signal_names: tuple[str, ...] | list[str]) -> None:
        """Watch exactly these signals (the config's list may differ from the defaults)."""
        if threading.current_thread() is not threading.main_thread():
            # Ray Train runs the loop in a thread, where Python cannot take signals; Ray restarts the
            # group from the last checkpoint instead. The time limit and the stop file still work.
            return
        wanted = {getattr(signal, name) for name in signal_names}
        for signum in set(self._previous) - wanted:
            signal.signal(signum, self._previous.pop(signum))
        for signum in wanted - set(self._previous):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        # A launcher may start us with these blocked, so that one sent before this point waits for us.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)

    @property
    def watched(self) -> list[str]:
        return sorted(signal.Signals(s).name for s in self._previous)

    def _on_signal(self, signum, _frame) -> None:
        self._received = self._received or signal.Signals(signum).name
        if self._on_signal_hook is not None:
            self._on_signal_hook()

    @property
    def received(self) -> str | None:
        """The signal's name, "stop file", or None."""
        if self._received is None and self._stop_file and os.path.exists(self._stop_file):
            self._received = "stop file"
        return self._received

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class StopController:
    """The collective part: one agreed decision per step from every rank's signals and rank 0's clock."""

    def __init__(self, signals: StopSignals, end_time: float | None, margin_s: float, is_main: bool, device):
        import torch

        self.signals = signals
        self._end_time = end_time
        self._margin_s = margin_s
        self._is_main = is_main
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)

    def agreed_stop(self, write_failed: bool = False) -> str | None:
        """Collective: the reason every rank stops after this step, or None to go on.

        `write_failed`: this rank's background checkpoint write failed; every rank then stops with
        `FAILED_WRITE` (the caller raises the failure, it does not save).
        """
        import torch.distributed as dist

        local = NO_STOP
        received = self.signals.received
        if write_failed:
            local = WRITE_FAILED
        elif received:
            local = SIGNALLED
        elif self._is_main and self._end_time is not None and time.time() >= self._end_time - self._margin_s:
            local = TIME_LIMIT
        self._flag.fill_(local)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        agreed = int(self._flag.item())
        if agreed and agreed != WRITE_FAILED and self._is_main:
            detail = f" ({received})" if received else ""
            log.warning("stopping for %s%s: saving what is new, then exiting to be requeued", REASONS[agreed], detail)
        return REASONS.get(agreed)
