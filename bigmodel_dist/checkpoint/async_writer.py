"""Asynchronous checkpoint writes: a snapshot in host memory is written, checksummed and reported by a thread.

`checkpoint/snapshot_engine.py` makes DeepSpeed hand its state over instead of writing it. After the
save call returns, `write_in_background` writes the queued files (`save_durably`: fsynced, checksummed
while written; the small files saved synchronously are checksummed after) and reports
this rank's share in a small JSON file (`.rank<r>.json`) beside them; rank 0's thread then waits for
every rank's report and commits the checkpoint (see `CheckpointManager.save`). No collective runs in the
background: the reports are files, so the training loop's collectives never interleave with the writer's.

A failure (a full disk, a vanished mount) is kept as `failure`, one line naming the rank, the path and
the cause. The training loop hears of every rank's failure through its per-step stop agreement and ends
the run with it; rank 0's commit stops waiting for reports once `abort()` is called.

At most one snapshot per rank exists at a time: a new save first waits for the previous write, which
bounds host memory to one checkpoint's share of this rank.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bigmodel_dist.checkpoint.durable_file import save_durably
from bigmodel_dist.checkpoint.integrity import describe_files, name_in
from bigmodel_dist.core.fileio import write_error, write_json_atomically

log = logging.getLogger(__name__)
REPORT_PREFIX = ".rank"
REPORT_POLL_S = 0.05


class BackgroundWriter:
    """One writer thread per rank.

    `wait_written()` returns once this rank's files are written and reported (or failed); `join()` also
    waits for what runs after (rank 0: the commit). `failure` is None or the first failure's description.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.failure: str | None = None
        self._thread: threading.Thread | None = None
        self._written = threading.Event()
        self._written.set()
        self._abort = threading.Event()

    def wait_written(self) -> None:
        self._written.wait()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def abort(self) -> None:
        """Stop waiting for other ranks' reports (their writes failed or the run is ending)."""
        self._abort.set()

    def write_in_background(self, pending: list[tuple[Any, str]], partial: Path, sync_files: list[str],
                            pool: ThreadPoolExecutor, then: Callable[[threading.Event], None] | None) -> None:
        """Write `pending` (with `pool`'s threads), then report this rank's files (those plus `sync_files`,
        already written); `then(abort_event)` runs afterwards in the same thread (rank 0: the commit)."""
        self.join()
        self._written.clear()
        self._abort.clear()

        def work() -> None:
            try:
                described = {name_in(partial, path): save_durably(state, path, pool).as_meta()
                             for state, path in pending}
                described.update(describe_files(partial, sync_files))
                write_json_atomically(partial / f"{REPORT_PREFIX}{self.rank}.json", described)
            except Exception as exc:  # the checkpoint stays partial and is never chosen
                self._fail(f"writing checkpoint {partial}", exc, partial)
                return
            finally:
                self._written.set()
            if then is not None:
                try:
                    then(self._abort)
                except Exception as exc:
                    self._fail(f"committing checkpoint {partial}", exc, partial)

        self._thread = threading.Thread(target=work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _fail(self, what: str, exc: Exception, partial: Path) -> None:
        self.failure = self.failure or f"rank {self.rank}: {what} failed: {write_error(partial, exc)}"
        log.error("%s", self.failure)


def wait_for_reports(partial: Path, world_size: int, abort: threading.Event) -> dict[str, dict] | None:
    """Every rank's file descriptions, merged, once all reports exist; None once `abort` is set."""
    reports = [partial / f"{REPORT_PREFIX}{r}.json" for r in range(world_size)]
    while not abort.is_set():
        if all(p.is_file() for p in reports):
            merged: dict[str, dict] = {}
            for report in reports:
                merged.update(json.loads(report.read_text()))
            return merged
        time.sleep(REPORT_POLL_S)
    return None
