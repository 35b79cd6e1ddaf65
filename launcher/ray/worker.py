"""What runs in each Ray Train worker: the shared trainer, resumed from Ray's checkpoint or the run dir,
with every logged step and committed checkpoint reported to Ray, stopping when the driver's stop file
appears (`launcher/ray/stop.py`).

Ray's checkpoint records are small manifests that point at the project's own step directories in the
run directory (`RAY_MANIFEST`): Ray never copies or deletes gigabytes, and Slurm, local and Ray runs
resume each other's checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from bigmodel_dist.checkpoint.manager import newest_committed
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.metrics.jsonl import read_metrics

log = logging.getLogger(__name__)

RAY_MANIFEST = "bigmodel_checkpoint.json"
BACKFILL_KEY = "backfill"  # earlier records rank 0 re-sends once per worker-group start
MAX_BACKFILL = 10_000


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / RAY_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def resume_choice(manifest: dict[str, Any] | None, run_dir: RunDir, configured: str) -> str:
    """`checkpoint.resume` for this (re)start of the worker group.

    An explicit user choice wins. Otherwise Ray's last registered checkpoint, unless the run directory
    holds a newer committed one (Ray registers a checkpoint only after every worker reported it, so a
    crash right after a save leaves Ray one behind) - "latest" then picks it, verified, with fallback.
    """
    if configured != "latest" or manifest is None:
        return configured
    ray_step, ray_path = manifest.get("step", -1), Path(manifest.get("path", ""))
    newest = newest_committed(run_dir)
    if newest is None and ray_path.is_dir():
        return str(ray_path)  # the run dir lost its pointer (e.g. a new output_dir): Ray knows the way
    if newest is not None and newest.meta["step"] > ray_step:
        log.info("Ray's checkpoint is step %d; the run directory has step %d: resuming from that", ray_step,
                 newest.meta["step"])
    return "latest"


def _numbers(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}


class RayReporter:
    """`ray.train.report` after every logged step; rank 0 attaches a manifest for each new committed
    checkpoint. Every rank calls `report` equally often (Ray's rule: it is a barrier).

    Reports still queued when a worker dies never reach Ray's controller (seen: the last two steps before
    a kill). So rank 0's first report after each start carries the earlier records of metrics.jsonl
    (flushed per line, so complete); the controller logs those it has not seen.
    """

    def __init__(self, run_dir: RunDir, is_main: bool, known_step: int = -1):
        self.checkpoints = run_dir.checkpoints
        self.metrics_file = run_dir.metrics
        self.is_main = is_main
        self._last_reported_step = known_step  # Ray's newest record: not reported again
        self._backfill_sent = False

    def report(self, step: int, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        payload = {"step": step, **_numbers(metrics)}
        if self.is_main and not self._backfill_sent:
            earlier = [_numbers(r) for r in read_metrics(self.metrics_file).records if r["step"] < step]
            payload[BACKFILL_KEY] = earlier[-MAX_BACKFILL:]
            self._backfill_sent = True
        committed = self._newest_unreported() if self.is_main else None
        if committed is None:
            ray.train.report(payload, checkpoint=None)
            return
        step_dir, committed_step = committed
        with tempfile.TemporaryDirectory(prefix="bigmodel-ray-") as manifest_dir:
            manifest = {"step": committed_step, "path": str(step_dir.resolve())}
            (Path(manifest_dir) / RAY_MANIFEST).write_text(json.dumps(manifest) + "\n")
            ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(manifest_dir),
                             checkpoint_dir_name=f"manifest_{step_dir.name}")
        self._last_reported_step = committed_step

    def _newest_unreported(self) -> tuple[Path, int] | None:
        """The committed checkpoint `latest` names, if Ray has not heard of it (async saves commit later)."""
        try:
            name = (self.checkpoints / "latest").read_text().strip()
        except OSError:
            return None
        step = int(name.rsplit("_", 1)[-1])
        return (self.checkpoints / name, step) if step > self._last_reported_step else None


def train_worker(job: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: the same trainer every launcher runs."""
    import ray.train

    from bigmodel_dist.config.loader import from_dict
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.core.env import LAUNCH_ID, STOP_FILE
    from bigmodel_dist.run.resolve import run_dir_of
    from bigmodel_dist.training.session import run_training
    from launcher.logs import setup_logging
    from launcher.ray.stop import DrainWatcher

    context = ray.train.get_context()
    # Ray exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; the node layout comes from its context.
    # The stop file is the driver's channel to the loop (launcher/ray/stop.py): it takes no signals here.
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
           "GROUP_RANK": str(context.get_node_rank()), STOP_FILE: job["stop_file"],
           LAUNCH_ID: job["stop_file"]}  # one per driver attempt: its markers (ray_job reads them)
    facts = facts_from_env(env)
    setup_logging(facts.rank, facts.world_size)
    for name in list(logging.root.manager.loggerDict):  # Ray Train logs every report at INFO
        if name.startswith("ray") or "/ray/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    cfg = from_dict(job["config"])  # checked on the driver; workers need not see the YAML file
    # W&B runs on Ray's controller (launcher/ray/wandb_logging.py), which outlives killed workers; the workers
    # keep metrics.jsonl only.
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb_mode="disabled"))
    run_dir = run_dir_of(cfg)
    checkpoint = ray.train.get_checkpoint()
    manifest = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            manifest = read_manifest(Path(directory))
    resume = resume_choice(manifest, run_dir, cfg.checkpoint.resume)
    if facts.is_main:
        log.info("Ray worker group of %d: Ray checkpoint %s; resume=%s", facts.world_size,
                 f"step {manifest['step']}" if manifest else "none", resume)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=resume))
    drains = DrainWatcher(Path(job["stop_file"])).start() if facts.is_main else None
    try:
        if cfg.resilience.health_check:  # Ray Train has the process group up already: seconds
            from bigmodel_dist.ft.faults import faults_from_env
            from bigmodel_dist.ft.health import check_before_training

            if cfg.ray.use_gpu:  # the check measures the current CUDA device: this worker's
                import ray.train.torch
                import torch

                torch.cuda.set_device(ray.train.torch.get_device())
            check_before_training(facts, cfg.resilience, cfg.logging, run_dir, faults_from_env())
        # No launcher of ours supervises a Ray worker: each watches itself for hangs (exit 86: Ray restarts
        # the group from the last checkpoint).
        run_training(cfg, facts, reporter=RayReporter(run_dir, facts.is_main, manifest["step"] if manifest else -1),
                     watch_self=True)
    finally:
        if drains is not None:
            drains.close()
