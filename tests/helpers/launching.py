"""`bigmodel launch local` (or any long-running command) as a test drives it: start, wait for a log line
or a file, signal, collect.

Every wait is on an event (a line the run prints, a file it writes, its exit) with HANG_GUARD_S only as
a guard against a hang, so the tests hold on machines of any speed; polls go through
tests/helpers/waiting.py's `wait_until`.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import REPO
from tests.helpers.commands import TINY_CONFIG, cli_command
from tests.helpers.guards import HANG_GUARD_S
from tests.helpers.waiting import wait_until


def launch_local_command(*overrides: str) -> list[str]:
    return cli_command(["launch", "local", TINY_CONFIG, "--nproc-per-node=2", *overrides])


class Launch:
    """A running command (`launch local`, `launch ray`, ...) whose output (stdout and stderr together) is
    read line by line; `cwd`: where it runs (the repository unless given)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path | str = REPO):
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._new.put(line)
        self._new.put(None)  # end of output: the process is exiting

    def wait_for_line(self, pattern: str) -> str:
        """The first line (from now on or already read) matching `pattern`; fails if the run ends first."""
        regex = re.compile(pattern)
        seen = next((line for line in self.lines if regex.search(line)), None)
        guard = time.monotonic() + HANG_GUARD_S
        while seen is None:
            try:
                line = self._new.get(timeout=max(0.0, guard - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within the hang guard") from None
            if line is None:
                self._new.put(None)
                raise AssertionError(f"the run ended before a line matching {pattern!r}:\n{self.output[-4000:]}")
            self.lines.append(line)
            if regex.search(line):
                seen = line
        return seen

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self) -> int:
        """Wait for the exit (guarded) and the whole output; returns the exit code."""
        code = self.proc.wait(timeout=HANG_GUARD_S)
        while (line := self._new.get(timeout=HANG_GUARD_S)) is not None:
            self.lines.append(line)
        self._new.put(None)
        return code

    def _take_ready(self) -> None:
        """Move the lines read so far into `lines`, without waiting for more."""
        while True:
            try:
                line = self._new.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._new.put(None)
                return
            self.lines.append(line)

    @property
    def output(self) -> str:
        """What the command printed so far (all of it once `finish` returned)."""
        self._take_ready()
        return "".join(self.lines)


def wait_for_step(launch: Launch, metrics: Path, step: int) -> None:
    """Until rank 0 logged `step` (metrics.jsonl), or fail if the run ends first."""
    wait_until(lambda: metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                                for line in metrics.read_text().splitlines()),
               f"step {step} logged", alive=[launch])


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses as a reader sees them (redone steps after a resume dropped)."""
    from bigmodel_dist.metrics.jsonl import read_metrics

    steps, values = read_metrics(run_dir / "metrics.jsonl").series("loss")
    return dict(zip(steps, values))
