"""W&B for Ray runs, on Ray Train's controller instead of rank 0.

When Ray hard-kills a worker, the W&B process of rank 0 dies with it and the steps it had buffered
are lost (seen: a 7-byte offline file). The controller outlives worker failures and restarts, so it
logs what rank 0 reports with `ray.train.report`, continuing the run's one W&B id (RUN_DIR/wandb_run_id).
Built on Ray's DeveloperAPI callbacks (ReportCallback, ControllerCallback): the public UserCallback has
no hook to finish the W&B run.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback

from bigmodel_dist.config.schema import LoggingConfig
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.metrics.logger import start_wandb
from launcher.ray.worker import BACKFILL_KEY

log = logging.getLogger(__name__)


class WandbOnController(ReportCallback, ControllerCallback):
    """Pickled to the controller actor; W&B starts there on the first report."""

    def __init__(self, run_dir: RunDir, logging_cfg: LoggingConfig, config: dict[str, Any], run_id: str,
                 already_logged_step: int):
        self.run_dir = run_dir
        self.logging_cfg = logging_cfg
        self.config = config
        self.run_id = run_id
        self.last_step = already_logged_step  # W&B refuses steps at or below its last one
        self._run = None
        self._started = False

    def after_report(self, training_report, metrics: list[dict[str, Any]]) -> None:
        rank0 = dict(metrics[0]) if metrics else {}
        records = [*rank0.pop(BACKFILL_KEY, []), rank0]  # re-sent history first (see RayReporter)
        new = [r for r in records if r.get("step") is not None and r["step"] > self.last_step]
        if not new:  # steps redone after a restart were logged already
            return
        if not self._started:
            self._started = True
            self._run = start_wandb(self.run_dir, self.logging_cfg, self.config, self.run_id)
        for record in new:
            if self._run is None:
                break
            try:
                self._run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except Exception as exc:  # W&B must never stop training
                log.warning("W&B logging failed (%s); metrics.jsonl still has every metric", exc)
                self._run = None
        self.last_step = max(r["step"] for r in new)

    def after_controller_finish(self, result) -> None:
        self._finish()

    def before_controller_abort(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
            # Now, while W&B's service process lives: left to W&B's atexit hook, the teardown runs after
            # Ray has ended the controller's child processes and prints a ConnectionResetError traceback.
            import wandb

            wandb.teardown()
        except Exception as exc:
            log.warning("W&B finish failed (%s)", exc)
        self._run = None
