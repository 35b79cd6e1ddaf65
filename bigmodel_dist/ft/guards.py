"""The loop's guards against bad steps and slow ranks: pure decisions, no collectives, no I/O.

`LossGuard` judges each step's loss (averaged over every rank, so every rank decides alike): a
non-finite loss or one above `spike_factor` x the mean of the recent good steps is bad, and the step is
skipped (DeepSpeed's own skip of a non-finite gradient, forced). `max_bad_steps` bad steps in a row ask
for a rollback to the last checkpoint saved before the first of them, passing over the samples read
since. Its memory (recent losses, the streak) lives in `TrainState`, so a resumed run judges exactly as
an uninterrupted one would.

`StragglerTracker` flags a rank whose compute time per step (its forward passes: no collective waits
there under ZeRO 0-2; under ZeRO-3 they hold parameter gathers, which hide a straggler) exceeds the
median of the other ranks by `straggler_factor` for `straggler_intervals` log intervals in a row.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.config.schema import ResilienceConfig

MIN_REFERENCE_FRACTION = 5  # a spike needs a reference: the window at least 1/5 full


@dataclass(frozen=True)
class Verdict:
    bad: bool
    reason: str = ""  # "non-finite loss", "loss spike (x7.1 the recent mean)"
    rollback: bool = False  # the streak reached max_bad_steps


GOOD_STEP = Verdict(False)


class LossGuard:
    def __init__(self, cfg: ResilienceConfig, state: TrainState):
        self.cfg, self.state = cfg, state

    def reference(self) -> float | None:
        recent = self.state.recent_losses
        if len(recent) < max(1, self.cfg.spike_window // MIN_REFERENCE_FRACTION):
            return None
        return sum(recent) / len(recent)

    def judge(self, loss: float) -> Verdict:
        """Before the step is applied: is `loss` (the all-rank mean) bad? Updates nothing."""
        if not math.isfinite(loss):
            reason = "non-finite loss"
        else:
            reference = self.reference()
            if reference is None or loss <= self.cfg.spike_factor * reference:
                return Verdict(False)
            reason = f"loss spike ({loss:.4g}, x{loss / reference:.1f} the recent mean)"
        return self.verdict_for(reason)

    def verdict_for(self, reason: str) -> Verdict:
        """A bad step for `reason`, and whether it completes a streak that asks for a rollback."""
        return Verdict(True, reason, rollback=self.state.bad_streak + 1 >= self.cfg.max_bad_steps)

    def record(self, step: int, loss: float, bad: bool) -> None:
        """After step `step` (1-based): a good step joins the reference window; a bad one extends the streak."""
        state = self.state
        if bad:
            if state.bad_streak == 0:
                state.first_bad_step = step
            state.bad_streak += 1
            return
        state.bad_streak = 0
        state.recent_losses = [*state.recent_losses, loss][-self.cfg.spike_window:]


class ComputeTimer:
    """This rank's time in the timed blocks (`with timer:`): wall clock on CPU; CUDA events on a GPU,
    read only when asked (at a log step), so timing adds no synchronisation to the step."""

    def __init__(self, device):
        self._cuda = getattr(device, "type", str(device)) == "cuda"
        self.reset()

    def reset(self) -> None:
        self._seconds = 0.0
        self._events: list = []

    def __enter__(self) -> ComputeTimer:
        if self._cuda:
            import torch

            self._events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self._events[-1][0].record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._seconds += time.perf_counter() - self._started

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1e3
            self._events = []
        return self._seconds


class StragglerTracker:
    """Rank 0's memory of slow ranks across log intervals (not checkpointed: a restart starts afresh)."""

    def __init__(self, cfg: ResilienceConfig):
        self.cfg = cfg
        self._streaks: dict[int, int] = {}

    def update(self, compute_s: list[float]) -> tuple[float, list[int]]:
        """This interval's per-rank compute seconds -> (slowest / median, ranks whose streak reached
        `straggler_intervals` just now)."""
        median = statistics.median(compute_s)
        if median <= 0 or len(compute_s) < 2:
            return 1.0, []
        newly = []
        for rank, seconds in enumerate(compute_s):
            others = statistics.median(compute_s[:rank] + compute_s[rank + 1:])  # two ranks: the other one
            if seconds > self.cfg.straggler_factor * others:
                self._streaks[rank] = self._streaks.get(rank, 0) + 1
                if self._streaks[rank] == self.cfg.straggler_intervals:
                    newly.append(rank)
            else:
                self._streaks.pop(rank, None)
        return max(compute_s) / median, newly
