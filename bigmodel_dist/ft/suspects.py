"""Nodes suspected of a fault (a hang, a failed health check), passed to the allocator for its next try.

The Slurm script exports `BIGMODEL_SUSPECT_NODES_FILE` (a path on the shared file system, one per job
attempt); whoever diagnoses a bad node appends its hostname there, and the script requeues the job
excluding those nodes when the cluster has others to spare. Outside Slurm the variable is unset and
recording is a no-op: the diagnosis is still in the logs and in `metrics.jsonl`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from bigmodel_dist.core.env import SUSPECT_NODES_FILE


def record_suspect_nodes(hosts: Iterable[str], env: Mapping[str, str] | None = None) -> Path | None:
    """Append `hosts` (one per line) to the suspects file when one is configured; returns its path."""
    env = os.environ if env is None else env
    target = env.get(SUSPECT_NODES_FILE)
    hosts = sorted(set(hosts))
    if not target or not hosts:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:  # appends of a few bytes: whole lines even with several writers
        out.write("".join(f"{host}\n" for host in hosts))
    return path


def read_suspect_nodes(path: Path) -> list[str]:
    try:
        return sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
    except FileNotFoundError:
        return []
