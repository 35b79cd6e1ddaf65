"""The run's `metrics.jsonl`: append-only records, restart markers, and the rule that deduplicates them.

Each record is {"step", "time", <metrics>}; a restart writes {"event": "restart", "step": s}. After a
resume from step s, steps > s logged before the restart were redone, so the reader drops them: every
step appears once, with its value from the run that counted. Unreadable lines are skipped and counted.

Incidents are records too, one line each: {"event": <kind>, "step", "time", <details>} with kind one of
`INCIDENTS` (a hang, a bad node, a straggler, a skipped step, a rollback, a mixture change, a resize, a corpus change, a batch-size change). They are kept as they were
written, also when the steps around them were redone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

INCIDENTS = ("hang", "bad_node", "straggler", "skip", "rollback", "mixture", "resize", "data", "batch")
# mixture: weights changed; data: the corpus changed under a resumed run (accepted with data.accept_corpus_change);
# batch: the global batch size changed on resume (the run goes on from the same sample)
LAUNCHER = "launcher"  # the `source` of incidents a launcher or health check wrote, not a trainer


@dataclass
class MetricsHistory:
    records: list[dict] = field(default_factory=list)  # deduplicated, in step order of logging
    restarts: list[dict] = field(default_factory=list)  # {"step", "time"} of each restart
    incidents: list[dict] = field(default_factory=list)  # {"event": kind, "step", "time", ...}
    last_trainer_step: int = 0  # the highest step any trainer line carries, redone steps included
    bad_lines: int = 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.records if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)

    def launcher_incidents_since_trainer(self) -> list[dict]:
        """Incidents a launcher wrote (`source: launcher`) after the last line a trainer wrote."""
        trainer_times = [r["time"] for r in [*self.records, *self.restarts, *self.incidents]
                         if r.get("source") != LAUNCHER and "time" in r]
        last = max(trainer_times, default=0.0)
        return [i for i in self.incidents if i.get("source") == LAUNCHER and i.get("time", 0) > last]


def read_metrics(path: Path) -> MetricsHistory:
    history = MetricsHistory()
    if not path.is_file():
        return history
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            history.bad_lines += 1
            continue
        if record.get("source") != LAUNCHER:
            history.last_trainer_step = max(history.last_trainer_step, step)
        if record.get("event") == "restart":
            history.restarts.append(record)
            history.records = [r for r in history.records if r["step"] <= step]  # redone after the resume
        elif "event" in record:
            history.incidents.append(record)
        else:
            history.records.append(record)
    return history


def append_incident(path: Path, kind: str, step: int, **details) -> dict:
    """One incident line, from a process that holds no `MetricsLogger` (a node's supervisor after its
    ranks were ended). Appends of one short line do not interleave with another writer's."""
    record = {"event": kind, "step": step, "time": time.time(), "source": LAUNCHER, **details}
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")
    return record
