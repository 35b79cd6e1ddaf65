"""Where each rank is (step and phase), published for its node's hang watchdog at the cost of a memory write.

Each rank maps a small file of its own (`rank-<R>.progress` in the folder named by
`BIGMODEL_PROGRESS_DIR`, which the node's supervisor creates) and overwrites one record in place at
every phase change: no system call, no lock. The supervisor maps the same files and reads them once a
second. A sequence number (odd while writing) lets the reader skip a torn record.

Each rank also registers a stack dump on SIGUSR2 (`faulthandler`, C level: it works while the main
thread is blocked inside a collective) into `rank-<R>.stacks` beside its record: the watchdog's view
into a hung process.
"""

from __future__ import annotations

import faulthandler
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bigmodel_dist.core.env import PROGRESS_DIR

DUMP_SIGNAL = signal.SIGUSR2
# In loop order: a rank at an earlier (step, phase) than another is behind it.
PHASES = ("startup", "data", "forward", "backward", "optimizer", "collective", "eval", "save", "shutdown", "done")
_RECORD = struct.Struct("<qqdqq")
HEARTBEAT_S = 10.0  # sequence, step, monotonic time, phase index, pid


@dataclass(frozen=True)
class Progress:
    rank: int
    step: int  # the step being worked on (1-based), 0 during start-up
    phase: str
    at: float  # time.monotonic() of the last change: one clock for every process of the node
    pid: int

    def position(self) -> tuple[int, int]:
        return self.step, PHASES.index(self.phase)


class ProgressRecorder:
    """The writer side, one per rank; `ProgressRecorder(None, rank)` records nothing (no supervisor)."""

    def __init__(self, folder: Path | None, rank: int):
        self._map: mmap.mmap | None = None
        self._stacks: IO[str] | None = None
        self._sequence = 0
        if folder is None:
            return
        path = folder / f"rank-{rank}.progress"
        with open(path, "w+b") as f:
            f.truncate(_RECORD.size)
            self._map = mmap.mmap(f.fileno(), _RECORD.size)
        self._stacks = open(folder / f"rank-{rank}.stacks", "w")
        faulthandler.register(DUMP_SIGNAL, file=self._stacks, all_threads=True, chain=False)
        self.mark("startup", 0)

    @classmethod
    def from_env(cls, rank: int, env: dict[str, str] | None = None) -> ProgressRecorder:
        folder = (os.environ if env is None else env).get(PROGRESS_DIR)
        return cls(Path(folder) if folder else None, rank)

    def mark(self, phase: str, step: int) -> None:
        if self._map is None:
            return
        self._sequence += 1  # odd: being written
        self._map[:8] = struct.pack("<q", self._sequence)
        self._map[8:] = _RECORD.pack(0, step, time.monotonic(), PHASES.index(phase), os.getpid())[8:]
        self._sequence += 1
        self._map[:8] = struct.pack("<q", self._sequence)

    @contextmanager
    def heartbeat(self, phase: str, step: int, every_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Mark `phase` again every `every_s` while the block runs: for long work that is progressing but
        has no steps of its own (a universal-checkpoint conversion in a subprocess, a checksum pass over
        the data). A hang inside the block is then not seen by the watchdog; keep such blocks few."""
        if self._map is None:
            yield
            return
        done = threading.Event()

        def beat() -> None:
            while not done.wait(every_s):
                self.mark(phase, step)

        self.mark(phase, step)
        thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.mark(phase, step)

    def close(self) -> None:
        if self._map is not None:
            self.mark("done", 0)
            faulthandler.unregister(DUMP_SIGNAL)
            self._map.close()
            self._map = None
        if self._stacks is not None:
            self._stacks.close()
            self._stacks = None


def read_progress(folder: Path) -> list[Progress]:
    """Every rank's last record in `folder` (ranks that have not started yet are absent)."""
    found = []
    for path in sorted(folder.glob("rank-*.progress")):
        rank = int(path.stem.split("-")[1])
        for _ in range(10):  # a writer mid-record: read again
            try:
                data = path.read_bytes()
            except OSError:
                break
            if len(data) < _RECORD.size:
                break
            sequence, step, at, phase, pid = _RECORD.unpack(data[:_RECORD.size])
            if sequence % 2 == 0 and sequence > 0:
                found.append(Progress(rank, step, PHASES[phase], at, pid))
                break
    return found
