"""The run's `metrics.jsonl`: append-only records, restart markers, and the rule that deduplicates them.

Each record is {"step", "time", <metrics>}; a restart writes {"event": "restart", "step": s}. After a
resume from step s, steps > s logged before the restart were redone, so the reader drops them: every
step appears once, with its value from the run that counted. Unreadable lines are skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MetricsHistory:
    records: list[dict] = field(default_factory=list)  # deduplicated, in step order of logging
    restarts: list[dict] = field(default_factory=list)  # {"step", "time"} of each restart
    bad_lines: int = 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.records if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)


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
        if record.get("event") == "restart":
            history.restarts.append(record)
            history.records = [r for r in history.records if r["step"] <= step]  # redone after the resume
        else:
            history.records.append(record)
    return history
