"""The run directory: one absolute folder, `<output_dir>/<name>`, and the name of everything in it.

Every reader and writer of a run's files (trainer, checkpoint savers, markers, metrics incidents, hang and
health reports, launchers, Ray's storage) goes through a `RunDir`, so the layout is written down once:

    RUN_DIR/config.yaml         the resolved config of the newest start
    RUN_DIR/ds_config.json      the DeepSpeed config the engine ran with
    RUN_DIR/metrics.jsonl       every metric and incident, appended across restarts
    RUN_DIR/wandb_run_id        the W&B run id, so every restart logs to the same W&B run
    RUN_DIR/checkpoints/        step_XXXXXXXX/ folders (and .partial- ones being written)
    RUN_DIR/logs/               job logs, hang diagnoses, health reports
    RUN_DIR/COMPLETED, STOPPED  markers: the run finished / stopped and saved (JSON: step, launch id)
    RUN_DIR/LEASE               the one live launch of the run: host, pid, since (launcher/lease.py)
    RUN_DIR/ray/                Ray Train's storage (when ray.storage_path is not set)
    RUN_DIR/metrics.png         `bigmodel plot`
    OUTPUT_DIR/.cache/          tokenizers, prepared data, `datasets` caches shared by the runs there
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_DIR_NAME = ".cache"  # under output_dir, shared by its runs, unless data.cache_dir is set


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        if not self.path.is_absolute():  # a relative one is re-rooted by every working directory it meets
            raise ValueError(f"run directory {self.path} must be absolute (config paths are resolved at load)")

    @classmethod
    def at(cls, output_dir: str | Path, name: str) -> RunDir:
        return cls(Path(os.path.abspath(Path(output_dir) / name)))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def deepspeed_config(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def wandb_run_id(self) -> Path:
        return self.path / "wandb_run_id"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def completed(self) -> Path:
        """Written by rank 0 when the run reached its end and saved."""
        return self.path / "COMPLETED"

    @property
    def stopped(self) -> Path:
        """Written by rank 0 when a stop request (preemption, time limit, resize) was saved."""
        return self.path / "STOPPED"

    @property
    def lease(self) -> Path:
        """Held by the one live launch of the run (launcher/lease.py)."""
        return self.path / "LEASE"

    @property
    def ray_storage(self) -> Path:
        return self.path / "ray"

    @property
    def plot(self) -> Path:
        return self.path / "metrics.png"

    def __str__(self) -> str:
        return str(self.path)


def read_marker(marker: Path) -> dict[str, Any] | None:
    """A COMPLETED/STOPPED record (step, tokens, stop reason and request, launch), or None: the one reader of
    the markers the trainer writes (`training/reporting.py`)."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def marker_of_launch(marker: Path, launch: str | None) -> dict[str, Any] | None:
    """The marker if the launch `launch` (its stop file: one per launch) wrote it, else None. A marker left
    by an earlier or a concurrent launch of the same run is never this one's."""
    record = read_marker(marker)
    return record if launch is not None and record is not None and record.get("launch") == launch else None
