"""Asynchronous checkpoint writes: DeepSpeed's state is snapshotted to host memory, written by a thread.

`SnapshotCheckpointEngine` replaces the engine's torch checkpoint engine: `save()` copies the state to
host memory and queues it instead of writing. After the save call returns, `write_in_background`
writes the queued files, fsyncs and checksums them and reports this rank's share in a small JSON file
(`.rank<r>.json`) beside them; rank 0's thread waits for every rank's report and commits the checkpoint
(see `CheckpointManager.save`). No collective runs in the background: the reports are files, so the
training loop's collectives never interleave with the writer's.

At most one snapshot per rank exists at a time: a new save first waits for the previous write, which
bounds host memory to one checkpoint's share of this rank.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from bigmodel_dist.checkpoint.integrity import describe_files
from bigmodel_dist.fileio import write_json_atomically

log = logging.getLogger(__name__)
REPORT_PREFIX = ".rank"


def snapshot(value: Any) -> Any:
    """A host-memory copy of every tensor in a nested state (the originals keep training)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.pending: list[tuple[Any, str]] = []

    def save(self, state_dict, path: str):
        self.pending.append((snapshot(state_dict), path))

    def take_pending(self) -> list[tuple[Any, str]]:
        pending, self.pending = self.pending, []
        return pending


class BackgroundWriter:
    """One writer thread per rank; `wait()` before anything that needs the previous save on disk."""

    def __init__(self):
        self._thread: threading.Thread | None = None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def write_in_background(self, pending: list[tuple[Any, str]], partial: Path, rank: int, sync_files: list[str],
                            then: Callable[[], None] | None) -> None:
        """Write `pending`, then report this rank's files (those plus `sync_files`, already written);
        `then` runs afterwards in the same thread (rank 0: the commit)."""
        self.wait()

        def work() -> None:
            try:
                for state, path in pending:
                    torch.save(state, path)
                names = sorted({str(Path(p).relative_to(partial)) for _, p in pending} | set(sync_files))
                write_json_atomically(partial / f"{REPORT_PREFIX}{rank}.json", describe_files(partial, names))
                if then is not None:
                    then()
            except Exception:  # the checkpoint stays partial and is never chosen; training goes on
                log.exception("background checkpoint write to %s failed", partial)

        self._thread = threading.Thread(target=work, name="checkpoint-writer", daemon=True)
        self._thread.start()


def wait_for_reports(partial: Path, world_size: int, timeout_s: float) -> dict[str, dict] | None:
    """Every rank's file descriptions, merged, once all reports exist; None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports = [partial / f"{REPORT_PREFIX}{r}.json" for r in range(world_size)]
        if all(p.is_file() for p in reports):
            merged: dict[str, dict] = {}
            for report in reports:
                merged.update(json.loads(report.read_text()))
            return merged
        time.sleep(0.05)
    return None
