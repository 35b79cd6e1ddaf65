"""Stop requests (signals, the job's time limit) turned into one stop step that every rank agrees on.

A signal may reach any subset of ranks; the time limit is judged by rank 0's clock. Every step, all
ranks all-reduce (MAX) one small flag, so they stop after the same step, save one checkpoint together
and exit with the requeue code.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

NO_STOP, SIGNALLED, TIME_LIMIT = 0, 1, 2
REASONS = {SIGNALLED: "signal", TIME_LIMIT: "time limit"}


class StopController:
    def __init__(self, signal_names: list[str], end_time: float | None, margin_s: float, is_main: bool,
                 device: torch.device):
        self._received: str | None = None
        self._end_time = end_time
        self._margin_s = margin_s
        self._is_main = is_main
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            # Ray Train runs the loop in a thread, where Python cannot take signals; Ray restarts the
            # group from the last checkpoint instead. The time limit still works.
            if is_main and signal_names:
                log.info("not the main thread: %s not watched; failures restart from the last checkpoint",
                         ", ".join(signal_names))
            return
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self._received = signal.Signals(signum).name  # act at the next step boundary, never mid-step

    def agreed_stop(self) -> str | None:
        """Collective: the reason every rank stops after this step, or None to go on."""
        local = NO_STOP
        if self._received:
            local = SIGNALLED
        elif self._is_main and self._end_time is not None and time.time() >= self._end_time - self._margin_s:
            local = TIME_LIMIT
        self._flag.fill_(local)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        agreed = int(self._flag.item())
        if agreed and self._is_main:
            detail = f" ({self._received})" if self._received else ""
            log.warning("stopping for %s%s: saving a checkpoint, then exiting to be requeued", REASONS[agreed], detail)
        return REASONS.get(agreed)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
