"""The node's hang watchdog: reads its ranks' progress records, declares a hang, and leaves a diagnosis.

A node is hung when none of its ranks changed step or phase for the phase's limit
(`resilience.startup_timeout_s` before the first step, `save_timeout_s` while a checkpoint is saved or
loaded and while the run shuts down, `hang_timeout_s` otherwise). The diagnosis, in `RUN_DIR/logs/hang-<time>-<host>/`: every rank's Python
stacks (all threads, dumped by the rank itself on SIGUSR2, see `progress.py`), each rank's last step
and phase (`ranks.json`), and the suspects: the ranks behind the node's most advanced one (a rank
stuck in its forward pass while the others wait in the gradient all-reduce). On NCCL, PyTorch's
collective flight recorder is dumped by each rank's NCCL watchdog into the same folder
(`flight_recorder_env`).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bigmodel_dist.config.schema import ResilienceConfig
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.ft.progress import DUMP_SIGNAL, Progress, read_progress

log = logging.getLogger(__name__)
SELF_WATCH_INTERVAL_S = 0.5  # how often a self-watching rank reads its record
SELF_HANG_GRACE_S = 10.0  # a self-watching rank that declared a hang waits this long for its peers' dumps
STACK_DUMP_WAIT_S = 5.0  # a rank's stack dump is a few KB written from a signal handler: quick


@dataclass(frozen=True)
class Hang:
    silent_s: float  # seconds since the last progress of any rank
    limit_s: float
    declared_at: float  # time.monotonic() of the declaration
    ranks: list[Progress]
    suspects: list[int]  # ranks behind the others: where to look first

    def summary(self) -> str:
        where = ", ".join(f"rank {p.rank} in {p.phase} of step {p.step}" for p in self.ranks) or "no rank started"
        blame = f"; behind the others: rank(s) {', '.join(map(str, self.suspects))}" if self.suspects else ""
        return f"no progress on this node for {self.silent_s:.0f}s (limit {self.limit_s:.0f}s): {where}{blame}"


class HangWatchdog:
    """Polled by the node's supervisor (`check()` once a second); pure reading, no threads of its own."""

    def __init__(self, progress_dir: Path, cfg: ResilienceConfig, started: float | None = None):
        self.progress_dir, self.cfg = progress_dir, cfg
        self._started = time.monotonic() if started is None else started

    def limit_for(self, ranks: list[Progress]) -> float:
        if any(p.phase in ("save", "shutdown") for p in ranks):
            return self.cfg.save_timeout_s
        if not ranks or any(p.phase == "startup" for p in ranks):
            return self.cfg.startup_timeout_s
        return self.cfg.hang_timeout_s

    def check(self, now: float | None = None) -> Hang | None:
        now = time.monotonic() if now is None else now
        ranks = [p for p in read_progress(self.progress_dir) if p.phase != "done"]
        if not ranks and any(p.phase == "done" for p in read_progress(self.progress_dir)):
            return None  # finished: shutting down
        last = max([p.at for p in ranks], default=self._started)
        limit = self.limit_for(ranks)
        if now - last < limit:
            return None
        return Hang(now - last, limit, now, ranks, suspects_of(ranks))


def suspects_of(ranks: list[Progress]) -> list[int]:
    """Ranks at an earlier (step, phase) than the node's most advanced rank; none when all are level."""
    if len(ranks) < 2:
        return []
    ahead = max(p.position() for p in ranks)
    return sorted(p.rank for p in ranks if p.position() < ahead)


def write_diagnosis(hang: Hang, progress_dir: Path, run_dir: RunDir) -> Path:
    """Ask every rank for its stacks, then gather them with the records into a new hang folder."""
    for p in hang.ranks:
        try:
            os.kill(p.pid, DUMP_SIGNAL)
        except ProcessLookupError:
            pass
    _request_flight_records(progress_dir)
    _wait_for_dumps(progress_dir, [p.rank for p in hang.ranks])
    host = socket.gethostname()
    folder = run_dir.logs / f"hang-{time.strftime('%Y%m%d-%H%M%S')}-{host}"
    folder.mkdir(parents=True, exist_ok=True)
    for p in hang.ranks:
        stacks = progress_dir / f"rank-{p.rank}.stacks"
        if stacks.exists():
            (folder / f"rank-{p.rank}.stacks.txt").write_text(stacks.read_text(errors="replace"))
    for trace in progress_dir.glob(f"{NCCL_TRACE_PREFIX}*"):  # NCCL flight records, where there are any
        shutil.copyfile(trace, folder / trace.name)
    report = {"host": host, "silent_s": hang.silent_s, "limit_s": hang.limit_s, "declared_at": hang.declared_at,
              "suspects": hang.suspects,
              "ranks": [asdict(p) for p in hang.ranks]}
    (folder / "ranks.json").write_text(json.dumps(report, indent=1) + "\n")
    return folder


def _wait_for_dumps(progress_dir: Path, ranks: list[int]) -> None:
    """Until every rank's stack file has content that stopped growing (bounded: a dead rank writes none)."""
    deadline = time.monotonic() + STACK_DUMP_WAIT_S
    sizes: dict[int, int] = {}
    while time.monotonic() < deadline:
        now = {r: _size(progress_dir / f"rank-{r}.stacks") for r in ranks}
        if all(now[r] > 0 for r in ranks) and now == sizes:
            return
        sizes = now
        time.sleep(0.2)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


NCCL_TRACE_PREFIX = "nccl-trace-rank-"
NCCL_PIPE_PREFIX = "nccl-pipe-rank-"


def flight_recorder_env(progress_dir: Path) -> dict[str, str]:
    """NCCL only: each rank keeps a ring of its recent collectives (PyTorch's flight recorder; gloo has
    none) and dumps it into `progress_dir` when a byte is written to its pipe there, which
    `write_diagnosis` does, or when a collective times out."""
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(progress_dir / NCCL_TRACE_PREFIX),
        "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": str(progress_dir / NCCL_PIPE_PREFIX),
    }


def _request_flight_records(progress_dir: Path) -> None:
    for pipe in progress_dir.glob(f"{NCCL_PIPE_PREFIX}*.pipe"):
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)  # no reader (a dead rank): skip it
        except OSError:
            continue
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)


def record_hang(run_dir: RunDir, hang: Hang, diagnosis: Path) -> None:
    """The `hang` incident in metrics.jsonl (every watchdog writes it here): the step, this host, how long the
    ranks were silent, the suspects and the diagnosis folder."""
    from bigmodel_dist.metrics.jsonl import append_incident

    step = max((p.step for p in hang.ranks), default=0)
    append_incident(run_dir.metrics, "hang", step, host=socket.gethostname(), silent_s=hang.silent_s,
                    suspects=hang.suspects, diagnosis=str(diagnosis))


class SelfWatchdog:
    """A rank that is its own supervisor (a Ray Train worker: Ray, not a launcher of ours, owns the
    processes). A daemon thread reads this rank's progress record; on a hang it writes this process's
    stacks (all threads) and position into `RUN_DIR/logs/hang-<time>-<host>-rank<R>/`, records the
    incident (rank 0), and ends the process with the hang exit code: Ray then restarts the worker group,
    which resumes from the last checkpoint. Every rank of a hung group declares its own hang."""

    def __init__(self, progress_dir: Path, cfg: ResilienceConfig, rank: int, run_dir: RunDir, is_main: bool):
        self._watchdog = HangWatchdog(progress_dir, cfg)
        self._rank, self._run_dir, self._is_main, self._cfg = rank, run_dir, is_main, cfg
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def start(self) -> SelfWatchdog:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(SELF_WATCH_INTERVAL_S):
            hang = self._watchdog.check()
            if hang is not None:
                self._end(hang)

    def _end(self, hang: Hang) -> None:
        host = socket.gethostname()
        folder = self._run_dir.logs / f"hang-{time.strftime('%Y%m%d-%H%M%S')}-{host}-rank{self._rank}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank-{self._rank}.stacks.txt", "w") as out:
            faulthandler.dump_traceback(out, all_threads=True)
        report = {"host": host, "silent_s": hang.silent_s, "limit_s": hang.limit_s, "declared_at": hang.declared_at,
                  "suspects": [], "ranks": [asdict(p) for p in hang.ranks]}
        (folder / "ranks.json").write_text(json.dumps(report, indent=1) + "\n")
        if self._is_main:
            record_hang(self._run_dir, hang, folder)
        # Not through `logging`: the hung thread may hold its lock.
        os.write(2, (f"hang: rank {self._rank}: {hang.summary()}; stacks in {folder}; ending this worker "
                     f"(exit {self._cfg.hang_exit_code}) for a restart\n").encode())
        # The other ranks of the group are silent too and declare within moments; leaving at once would
        # break their collective first, and they would end with a connection error instead of a dump.
        time.sleep(min(SELF_HANG_GRACE_S, self._cfg.hang_timeout_s))
        logging.shutdown()
        os._exit(self._cfg.hang_exit_code)  # a rank stuck in a collective cannot unwind: end the process

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
