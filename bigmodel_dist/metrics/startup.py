"""Where start-up goes: the time from this process's start to its first optimizer step, by phase.

Large runs spend minutes before their first step (imports, the process group, op loads, data checks,
engine build); knowing which phase grew is the first step to cutting it. The clock starts when the
kernel started the process (before the interpreter), so interpreter start-up and imports count too.
"""

from __future__ import annotations

import faulthandler
import os
import time


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc); now where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, after boot
        with open("/proc/stat") as boot:
            boot_time = next(int(line.split()[1]) for line in boot if line.startswith("btime"))
        return boot_time + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class StartupClock:
    """`mark(phase)` closes a phase that began at the previous mark (the first at process start)."""

    def __init__(self, started_at: float | None = None):
        self.started_at = process_start_time() if started_at is None else started_at
        self._last = self.started_at
        self._dumping = False
        self.phases: dict[str, float] = {}

    def dump_stacks_after(self, seconds: float) -> None:
        """Until `done()`, print every thread's stack to stderr after `seconds` of waiting, and again
        every `seconds`: a start-up stuck in an import, a lock or a collective shows where."""
        if seconds > 0 and not self._dumping:
            faulthandler.dump_traceback_later(seconds, repeat=True)
            self._dumping = True

    def done(self) -> None:
        """The first step is done: no more stack dumps."""
        if self._dumping:
            faulthandler.cancel_dump_traceback_later()
            self._dumping = False

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + max(0.0, now - self._last)
        self._last = now

    @property
    def total_s(self) -> float:
        return self._last - self.started_at

    def as_metrics(self) -> dict[str, float]:
        return {"startup/total_s": self.total_s, **{f"startup/{name.replace(' ', '_')}_s": s
                                                    for name, s in self.phases.items()}}

    def summary(self) -> str:
        return f"start-up {self.total_s:.1f}s from process start to the first step: {format_phases(self.phases)}"


def format_phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items())


def slowest_rank_note(all_phases: list[dict[str, float]], min_excess_s: float = 5.0) -> str | None:
    """A line naming another rank that held everyone up, or None.

    Phases end at collectives, so a rank that is slow in its own work (an import, a disk) shows as
    waiting in everyone else's next phase: name the rank with the longest single phase when that
    phase took at least `min_excess_s` and twice as long as on rank 0.
    """
    rank, phase = max(((r, p) for r, phases in enumerate(all_phases) for p in phases),
                      key=lambda rp: all_phases[rp[0]][rp[1]])
    seconds, on_rank0 = all_phases[rank][phase], all_phases[0].get(phase, 0.0)
    if rank == 0 or seconds - on_rank0 < min_excess_s or seconds < 2 * on_rank0:
        return None
    return (f"slowest start-up: rank {rank} spent {seconds:.1f}s in {phase} (rank 0: {on_rank0:.1f}s): "
            f"{format_phases(all_phases[rank])}")
