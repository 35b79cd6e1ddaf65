"""One live launch per run directory: a lease file that names its holder and is refreshed while it lives.

The launch that starts a run's processes creates `RUN_DIR/LEASE` (JSON: host, pid, the process's start
time, since, launch id, Slurm job) atomically (a finished temporary file hard-linked into place: it
exists whole or not at all), refreshes its mtime every HEARTBEAT_S from a thread, and removes it when
it ends. A second launch of the same run finds it held and stops with one line naming the holder (exit
2) before it touches anything. It takes the lease over when the holder is gone: on this host its process
no longer exists (SIGKILL, a crash), on another host its lease has not been refreshed for STALE_S (a
lost node). A requeued Slurm job (the same job id) waits up to REQUEUE_WAIT_S for its previous attempt,
which Slurm is still ending, to let go.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.run_dir import RunDir

log = logging.getLogger(__name__)
HEARTBEAT_S = 10.0
STALE_S = 6 * HEARTBEAT_S  # a holder on another host that has not refreshed for this long is gone
REQUEUE_WAIT_S = 120.0  # Slurm's KillWait is 30 s by default; the old attempt saves within it
RETRY_S = 0.5


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None if it is
    gone: with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Lease:
    """`Lease.take(run_dir, launch_id)`; `release()` when the launch ends (idempotent)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._beat.start()

    @classmethod
    def take(cls, run_dir: RunDir, launch_id: str) -> Lease:
        path = run_dir.lease
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "since": time.time(), "launch": launch_id, "slurm_job": os.environ.get("SLURM_JOB_ID")}
        run_dir.path.mkdir(parents=True, exist_ok=True)
        waiting_since: float | None = None
        while True:
            if _create(path, me):
                return cls(path, me)
            holder = _read(path)
            if holder is None:  # released (or taken over) between our tries
                continue
            gone = _holder_gone(holder, path)
            if gone:
                if _set_aside(path, holder):
                    log.warning("run dir %s: taking over the lease of %s (%s)", run_dir, _who(holder), gone)
                continue
            if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"]:  # this job's previous attempt
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since < REQUEUE_WAIT_S:
                    time.sleep(RETRY_S)
                    continue
            raise UserInputError(f"run dir {run_dir}: in use by a live launch, {_who(holder)}; stop that one first "
                                 "(or wait for it), or start a new run with --name or --output_dir")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if (_read(self.path) or {}).get("launch") != self.holder["launch"]:
                    return  # taken over (we were thought gone): never touch another launch's lease
                os.utime(self.path)
            except OSError:
                pass  # a disk problem: the run itself reports it

    def release(self) -> None:
        self._stop.set()
        if (_read(self.path) or {}).get("launch") == self.holder["launch"]:
            self.path.unlink(missing_ok=True)


def _create(path: Path, holder: dict[str, Any]) -> bool:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(holder) + "\n")
    try:
        os.link(tmp, path)  # atomic, and fails when the lease exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _holder_gone(holder: dict[str, Any], path: Path) -> str | None:
    """Why the holder is gone, or None while it may live."""
    if holder.get("host") == socket.gethostname():
        start = _process_start(int(holder.get("pid", -1)))
        return None if start is not None and start == holder.get("pid_start") else "its process is gone"
    try:
        silent = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return f"no heartbeat for {silent:.0f} s" if silent > STALE_S else None


def _set_aside(path: Path, holder: dict[str, Any]) -> bool:
    """Move a dead holder's lease out of the way; False when another launch did it first."""
    aside = path.with_name(f".{path.name}.gone-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if (_read(aside) or {}).get("launch") != holder.get("launch"):  # a live holder slipped in: give it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # yet another launch holds it now; that one's heartbeat keeps it
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _who(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')} since {since}{job}"
