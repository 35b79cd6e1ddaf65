"""The one way a test waits: poll for an event, with HANG_GUARD_S (tests/helpers/guards.py) only as a guard."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from tests.helpers.guards import HANG_GUARD_S

if TYPE_CHECKING:
    from tests.helpers.launching import Launch

T = TypeVar("T")
OUTPUT_TAIL = 6000  # characters of an ended Launch's output in the failure


def wait_until(done: Callable[[], T], what: str, *, alive: Sequence[subprocess.Popen | Launch] = (),
               interval: float = 0.05, guard: float = HANG_GUARD_S) -> T:
    """Call `done()` every `interval` seconds until it returns something truthy; return that value.

    This waits on events (a file written, a line logged, a job state): `guard` is no speed requirement,
    it only turns a hang into a failure ("<what> not within the hang guard (<guard> s)").

    `alive`: processes that must not end first, each a subprocess.Popen or a tests.helpers.launching.Launch.
    If one has exited and `done()` is still not truthy, this fails naming `what`, with the tail of the
    output for a Launch (read as it came); a Popen's piped output cannot be read safely here (a process it
    started may hold the pipe open), so only its exit code is given.
    """
    deadline = time.monotonic() + guard
    while True:
        value = done()
        if value:
            return value
        ended = [process for process in alive if getattr(process, "proc", process).poll() is not None]
        if ended:
            value = done()  # the event may have come just before the exit: then nothing ended first
            if value:
                return value
            raise AssertionError(_ended_first(ended[0], what))
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not within the hang guard ({guard:g} s)")
        time.sleep(interval)


def _ended_first(process: subprocess.Popen | Launch, what: str) -> str:
    proc = getattr(process, "proc", process)
    ended = f"process {proc.pid} ended (exit {proc.returncode}) before {what}"
    output = getattr(process, "output", None)  # a Launch: stdout and stderr together
    return f"{ended}:\n{output[-OUTPUT_TAIL:]}" if output is not None else ended
