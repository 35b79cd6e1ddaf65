"""How a stop reaches Ray Train workers: one request file in the run directory that every worker polls.

Ray runs the training loop in a thread, where Python takes no signals, so `ray job stop` (SIGTERM to
the job's driver) and a node drained for preemption are passed on through a file instead:

- the driver (`launcher/ray/job.py`) names a new file per driver, `RUN_DIR/ray/stop-<time>-<id>`, and
  hands it to every worker, whose `DistributedFacts.stop_file` points at it. Its signal handler writes
  the file (`DriverStop`). A fresh name per driver means that a file left by an earlier driver, or
  written for a driver still shutting down, never stops another submission's workers;
- rank 0 of the workers writes the same file when Ray reports that a node of the worker group is being
  drained (`DrainWatcher`, Ray Train >= 2.58's preemption watcher);
- every rank looks for the file after each step (`StopSignals.received`) and the ranks agree by an
  all-reduce (`StopController.agreed_stop`): one checkpoint at that step, then a clean return.

The run directory is already the storage every node shares (checkpoints, `latest`), so the channel
needs nothing beyond it; an NFS client may see a new file only after its attribute cache expires
(`acdirmax`, 60 s by default), which `ray.stop_wait_s` must cover.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bigmodel_dist.core.fileio import write_text_atomically
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.ft.preemption import DEFAULT_STOP_SIGNALS, StopSignals

log = logging.getLogger(__name__)

STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's seconds between `ray job stop`'s SIGTERM and SIGKILL
RAY_DEFAULT_STOP_WAIT_S = 3  # Ray's default (job_supervisor.py)
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set for every `ray job submit` entrypoint
# `ray job stop` sends SIGTERM, or SIGINT with RAY_JOB_STOP_SIGNAL=SIGINT; the config's stop signals too.
DRIVER_SIGNALS = ("SIGINT",)
DRAIN_POLL_S = 1.0  # reads a field in this process (Ray's own watcher asks the GCS every 5 s)


def new_stop_file(run_dir: RunDir) -> Path:
    """A request file no other driver uses (its folder is created; the file is not)."""
    folder = run_dir.ray_storage
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"stop-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def request_stop(stop_file: Path, reason: str) -> None:
    """Ask every worker to stop after its current step (idempotent; the first reason stays)."""
    if not stop_file.exists():
        write_text_atomically(stop_file, reason + "\n")


def stop_reason(stop_file: Path | None) -> str | None:
    """Why a stop was requested through `stop_file`, or None when none was."""
    try:
        return stop_file.read_text().strip() if stop_file else None
    except OSError:
        return None


def job_stop_wait_s(env: Mapping[str, str]) -> int | None:
    """Seconds Ray gives this driver between `ray job stop`'s signal and SIGKILL; None when the driver
    was not started by `ray job submit` (nobody will kill it then)."""
    if JOB_CONFIG_ENV not in env:
        return None
    return int(env.get(STOP_WAIT_ENV, RAY_DEFAULT_STOP_WAIT_S))


class DriverStop:
    """The driver's stop signals, watched from its first line; each one writes the stop file.

    A signal that comes before the run directory is known is remembered and written out by `attach`.
    The handler only writes a small file: logging is left to the main thread (`announce_once`).
    """

    def __init__(self) -> None:
        self.stop_file: Path | None = None
        self.received_at: float | None = None  # time.monotonic() of the first stop signal
        self.signals = StopSignals((*DEFAULT_STOP_SIGNALS, *DRIVER_SIGNALS), on_signal=self._on_signal)
        self._announced = False

    def watch(self, config_signals: list[str]) -> None:
        self.signals.watch(sorted({*config_signals, *DRIVER_SIGNALS}))

    def attach(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        if self.signals.received:
            self._on_signal()

    def reclaim(self) -> None:
        """Our handlers back in front, after `ray.init`. Ray's core installs absl's failure handler for
        SIGTERM, which prints a stack, passes the signal on to ours and then aborts the process 3 s later
        (absl's alarm_on_failure_secs): long before the workers' stop checkpoint. Re-installing the same
        Python handler leaves no moment without one."""
        for name in self.signals.watched:
            signum = getattr(signal, name)
            signal.signal(signum, signal.getsignal(signum))

    @property
    def received(self) -> str | None:
        return self.signals.received

    def _on_signal(self) -> None:
        self.received_at = self.received_at or time.monotonic()
        if self.stop_file is not None:
            request_stop(self.stop_file, f"{self.signals.received} to the Ray job's driver (ray job stop)")

    def announce_once(self, wait_s: int | None) -> None:
        """Log the stop once, from the main thread, with the time Ray leaves before it kills the job."""
        if self._announced or not self.received:
            return
        self._announced = True
        deadline = f"; Ray kills the job {wait_s} s after its signal ({STOP_WAIT_ENV})" if wait_s else ""
        log.warning("%s: asked the workers to stop after their current step and save (%s)%s", self.received,
                    self.stop_file, deadline)

    def close(self) -> None:
        self.signals.close()


def _ray_preemption_reader() -> Callable[[], Any] | None:
    """A function returning Ray Train's preemption notice for this worker (None until a node of the
    group is drained), or None when this Ray has no such notice (before 2.58, or Train V1).

    Reads the field that Ray's watcher sets on every worker (`RayTrainWorker.mark_preempt`), not
    `ray.train.get_preemption_info()`, which is a barrier and could not be called from a side thread.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().preemption_context  # noqa: B018  (present in this Ray?)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return lambda: get_train_context().preemption_context.preemption_info


class DrainWatcher:
    """On rank 0 of the Ray workers: turns Ray's notice that a node of the group is being drained
    (preempted) into a stop request, so the ranks save at the next step instead of losing the work
    since the last checkpoint when the node goes."""

    def __init__(self, stop_file: Path, read_notice: Callable[[], Any] | None = None,
                 poll_s: float = DRAIN_POLL_S):
        self._read = read_notice or _ray_preemption_reader()
        self._stop_file, self._poll_s = stop_file, poll_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> DrainWatcher:
        if self._read is None:
            log.info("this Ray reports no node drains to workers (Ray Train >= 2.58 does): a drained node's "
                     "work since the last checkpoint is redone after Ray's restart")
            return self
        self._thread = threading.Thread(target=self._watch, name="bigmodel-drain-watch", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        assert self._read is not None
        while not self._done.wait(self._poll_s):
            notice = self._read()
            if notice is not None:
                nodes = getattr(notice, "preempted_node_ids", "?")
                deadline_ms = getattr(notice, "deadline_ms", None)
                left = f", {deadline_ms / 1000 - time.time():.0f} s before the deadline" if deadline_ms else ""
                log.warning("Ray is draining node(s) %s of this worker group%s: stopping after this step to save",
                            nodes, left)
                request_stop(self._stop_file, f"Ray drains node(s) {nodes} (preemption){left}")
                return

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

