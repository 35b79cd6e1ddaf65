"""Where start-up goes: the time from this process's start to its first optimizer step, by phase.

Large runs spend minutes before their first step (imports, the process group, op loads, data checks,
engine build); knowing which phase grew is the first step to cutting it. The clock starts when the
kernel started the process (before the interpreter), so interpreter start-up and imports count too.
"""

from __future__ import annotations

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
        self.phases: dict[str, float] = {}

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
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phases.items())
        return f"start-up {self.total_s:.1f}s from process start to the first step: {parts}"
