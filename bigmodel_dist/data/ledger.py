"""An audit of the data order: which global samples every rank read at every step (opt-in).

With `BIGMODEL_SAMPLE_LEDGER=<folder>` each training process appends one JSON line per micro-batch to
its own file there: step, micro-step, rank, world size, the global sample indices. `samples_by_step`
reads a run's folder back as the run counted it: for each step, the micro-batches of the last rank
group that ran it (an earlier group's work on a step that was redone after a restart or a resize is
dropped). A run whose data order is exact reads samples [s*G, (s+1)*G) at step s, each once, whatever
its world sizes were.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bigmodel_dist.core.env import SAMPLE_LEDGER


class SampleLedger:
    """This process's ledger file, or nothing when the variable is unset."""

    def __init__(self, folder: str | None, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self._file = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(folder) / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a", buffering=1)

    @staticmethod
    def from_env(rank: int, world_size: int) -> SampleLedger:
        return SampleLedger(os.environ.get(SAMPLE_LEDGER), rank, world_size)

    def record(self, step: int, micro_step: int, samples: Sequence[int]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "micro": micro_step, "rank": self.rank, "world": self.world_size,
                                         "samples": list(samples), "time": time.time()}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def samples_by_step(folder: Path) -> dict[int, list[int]]:
    """Step -> the sorted global samples the run counted for it (see the module doc)."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for path in Path(folder).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a process killed mid-line
                continue
            by_step[record["step"]].append(record)
    counted = {}
    for step, records in by_step.items():
        records.sort(key=lambda r: r["time"])
        world = records[-1]["world"]
        last = {(r["micro"], r["rank"]): r["samples"] for r in records if r["world"] == world}
        counted[step] = sorted(sample for samples in last.values() for sample in samples)
    return counted
