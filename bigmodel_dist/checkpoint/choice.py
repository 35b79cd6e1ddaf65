"""Choosing the checkpoint to resume from while start-up goes on.

Reading every file of a large checkpoint to check its checksums takes seconds to minutes, and so does
building the model and the DeepSpeed engine. A `ResumeChoice` reads the newest candidate's metadata at
once (rank 0, broadcast) and starts checking this rank's share of its files in a thread; the trainer
builds the engine meanwhile and calls `result()` (collective) before loading. A candidate that fails is
reported and the next older one is checked then, as before: nothing is loaded that was not verified.
The checking threads run no collective: every collective stays in the calling thread, in rank order.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bigmodel_dist.checkpoint.integrity import check_files, read_checkpoint_meta
from bigmodel_dist.checkpoint.train_state import saved_train_state
from bigmodel_dist.core.distributed import DistributedFacts, broadcast_from_rank0
from bigmodel_dist.core.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    meta: dict[str, Any]

    @property
    def train_state(self) -> dict[str, Any]:
        return saved_train_state(self.meta)


class ResumeChoice:
    """`candidate`: the checkpoint being checked (None: nothing to resume from); `result()`: the first
    candidate, newest first, whose files every rank found intact. `explicit`: the user named the
    checkpoint, so a damaged one is an error rather than a fallback."""

    def __init__(self, candidates: list[Path], explicit: bool, facts: DistributedFacts, pool: ThreadPoolExecutor):
        self._rest, self._explicit, self._facts, self._pool = list(candidates), explicit, facts, pool
        self.candidate: ResumePoint | None = None
        self._check: Future | None = None
        self._check_next()

    def result(self) -> ResumePoint | None:
        """Collective: every rank's verdict on the candidate; an older one where it fails."""
        while self.candidate is not None and self._check is not None:
            problems: list[str | None] = [None] * self._facts.world_size
            dist.all_gather_object(problems, self._check.result())
            problem = next((p for p in problems if p), None)
            if problem is None:
                self._check = None  # verified: later calls return it at once
                break
            self._reject(self.candidate.path, problem)
            self._check_next()
        return self.candidate

    def _check_next(self) -> None:
        """The next candidate with readable metadata, its files being checked in the background."""
        self.candidate, self._check = None, None
        while self._rest:
            path = self._rest.pop(0)
            found = None
            if self._facts.is_main:
                found = (None, "is not a directory") if not path.is_dir() else read_checkpoint_meta(path)
            meta, problem = broadcast_from_rank0(found)
            if meta is None:
                self._reject(path, problem or "unreadable metadata")
                continue
            names = sorted(meta["files"])
            mine = names[self._facts.rank :: self._facts.world_size]
            self.candidate = ResumePoint(path, meta)
            self._check = self._pool.submit(check_files, path, meta["files"], mine)
            return

    def _reject(self, path: Path, problem: str) -> None:
        if self._explicit:
            raise UserInputError(f"checkpoint {path}: {problem}; pass another --resume or latest")
        if self._facts.is_main:
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path, problem)
