"""A resume on another world size is a resize: elastic training shrank after a lost node or grew back.

One `resize` incident in metrics.jsonl (and W&B) says from what size to what, why, and what it cost:
the steps redone, the wall time from the last line the previous ranks wrote to this start, and the
universal-checkpoint conversion (cached, so only the first rank group on a new size pays it).
"""

from __future__ import annotations

import time
from typing import Any

from bigmodel_dist.core.run_dir import RunDir, read_marker
from bigmodel_dist.metrics.jsonl import LAUNCHER, MetricsHistory

GROW_PREFIX = "grow"  # a stop reason that starts with it: the launcher stopped the run to grow it


def stop_reason_at(run_dir: RunDir, step: int) -> str | None:
    """Why the previous rank group stopped, when it stopped at `step` (its STOPPED marker): a periodic
    checkpoint at the stop step is not saved again, so the checkpoint itself may not say it."""
    marker = read_marker(run_dir.stopped)
    if marker is None or marker.get("step") != step:
        return None
    return marker.get("stop_request") or marker.get("stop_reason")


def resize_details(old_size: int, new_size: int, resumed_step: int, stop_reason: str | None,
                   history: MetricsHistory, conversion_s: float, now: float | None = None) -> dict[str, Any]:
    """The fields of a `resize` incident."""
    if (stop_reason or "").startswith(GROW_PREFIX):
        reason = stop_reason
    elif new_size < old_size:
        reason = "fewer ranks: a worker or node was lost, or the run was restarted smaller"
    else:
        reason = "more ranks: the run was restarted larger"
    last_seen = max((r["time"] for r in [*history.records, *history.restarts, *history.incidents]
                     if r.get("source") != LAUNCHER and "time" in r), default=None)
    lost_s = (now or time.time()) - last_seen if last_seen is not None else 0.0
    return {"old_size": old_size, "new_size": new_size, "reason": reason,
            "lost_steps": max(0, history.last_trainer_step - resumed_step), "lost_s": round(lost_s, 2),
            "conversion_s": round(conversion_s, 2)}
