"""Metrics of a run: `metrics.jsonl` in the run directory, a progress line or bar, W&B on rank 0.

Only rank 0 writes; every rank may call (others are no-ops), so callers need no rank branches.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import threading
import time
from typing import Any, Literal, cast

from bigmodel_dist.config.schema import LoggingConfig
from bigmodel_dist.core.fileio import write_text_atomically
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.metrics.jsonl import read_metrics

log = logging.getLogger(__name__)
WandbMode = Literal["online", "offline", "disabled"]  # logging.wandb_mode, checked by the config schema

# Dense bf16 peak per device (TFLOP/s), for MFU. Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def device_peak_tflops(logging_cfg: LoggingConfig, device_name: str) -> float | None:
    if logging_cfg.peak_tflops_per_device is not None:
        return logging_cfg.peak_tflops_per_device
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


class MetricsLogger:
    """Writes one JSON line per log call (flushed), shows progress, mirrors to W&B when it works.

    W&B starts in a background thread (seconds; up to `wandb_init_timeout_s` for an unreachable server)
    while the process group, data and engine are set up; the first `log` waits for it, so nothing logged
    is held back from W&B where a killed process would lose it. W&B failures never stop training:
    online falls back to offline, offline to disabled, with a warning.
    """

    def __init__(self, run_dir: RunDir, logging_cfg: LoggingConfig, config: dict, is_main: bool, max_steps: int):
        self.is_main = is_main
        self.run_id: str | None = None
        self._file = None
        self._wandb_run = None
        self._wandb_starter: threading.Thread | None = None
        self._progress = None
        self._wandb_skip_through = 0
        self._pending_wandb: dict[str, int] = {}
        if not is_main:
            return
        run_dir.path.mkdir(parents=True, exist_ok=True)
        path = run_dir.metrics
        history = read_metrics(path)
        # Steps already in W&B from earlier processes: every step a trainer wrote, also the steps that a
        # rollback redid since (W&B refuses to go back below them).
        self._logged_before = history.last_trainer_step
        # Incidents a launcher recorded after the last trainer died (a hang) reach W&B with the next step.
        self._pending_wandb = {f"incident/{i['event']}": 1 for i in history.launcher_incidents_since_trainer()}
        self._file = open(path, "a", buffering=1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(total=max_steps, desc="train", unit="step", dynamic_ncols=True)
        self.run_id = wandb_run_id(run_dir)
        self._wandb_starter = threading.Thread(target=self._start_wandb, args=(run_dir, logging_cfg, config),
                                               name="wandb-start", daemon=True)
        self._wandb_starter.start()

    def _start_wandb(self, run_dir: RunDir, logging_cfg: LoggingConfig, config: dict) -> None:
        self._wandb_run = start_wandb(run_dir, logging_cfg, config, self.run_id)

    def mark_restart(self, step: int, redone_through: int | None = None) -> None:
        """A resume from `step` (at start-up, or a rollback that redoes steps up to `redone_through`):
        later steps logged before are redone. metrics.jsonl records the restart (its reader drops the
        redone lines); W&B keeps its first logging of the redone steps, since it refuses steps below its
        last one, so they are skipped there."""
        if not self.is_main:
            return
        logged = self._logged_before if redone_through is None else redone_through
        if not logged:  # nothing logged before: a fresh run
            return
        self._write({"event": "restart", "step": step, "time": time.time()})
        self._wandb_skip_through = max(self._wandb_skip_through, logged)
        if self._progress is not None:
            self._progress.n = step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        plain = {k: _plain(v) for k, v in metrics.items()}
        self._write({"step": step, "time": time.time(), **plain})
        self._wait_for_wandb()
        if self._wandb_run is not None and step > self._wandb_skip_through:
            try:
                numbers = {k: v for k, v in plain.items() if isinstance(v, (int, float))}
                self._wandb_run.log({**self._pending_wandb, **numbers}, step=step)
                self._pending_wandb = {}
            except Exception as exc:  # a broken W&B must never stop training
                log.warning("W&B logging failed (%s: %s); continuing without W&B", type(exc).__name__, exc)
                self._wandb_run = None
        line = " ".join(f"{k}={_short(v)}" for k, v in plain.items() if not isinstance(v, list))
        if self._progress is not None:
            self._progress.n = step
            self._progress.set_postfix_str(line, refresh=True)
        else:
            log.info("step %d %s", step, line)

    def incident(self, step: int, kind: str, **details: Any) -> None:
        """One incident line (see `metrics_file.INCIDENTS`) in metrics.jsonl and W&B, and a warning."""
        if not self.is_main:
            return
        plain = {k: _plain(v) for k, v in details.items()}
        self._write({"event": kind, "step": step, "time": time.time(), **plain})
        log.warning("%s at step %d: %s", kind, step, " ".join(f"{k}={_short(v)}" for k, v in plain.items()))
        self._wait_for_wandb()
        if self._wandb_run is not None and step > self._wandb_skip_through:
            try:
                numbers = {f"incident/{kind}/{k}": v for k, v in plain.items() if isinstance(v, (int, float))}
                self._wandb_run.log({f"incident/{kind}": 1, **numbers}, step=step)
            except Exception as exc:
                log.warning("W&B logging failed (%s: %s); continuing without W&B", type(exc).__name__, exc)
                self._wandb_run = None

    def _write(self, record: dict) -> None:
        assert self._file is not None, "only rank 0 writes metrics.jsonl"
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed process loses nothing it logged

    def _wait_for_wandb(self) -> None:
        """Until W&B's start is over (succeeded or not)."""
        if self._wandb_starter is not None:
            self._wandb_starter.join()
            self._wandb_starter = None

    @property
    def wandb_dir(self) -> str | None:
        self._wait_for_wandb()
        return self._wandb_run.dir if self._wandb_run is not None else None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        self._wait_for_wandb()
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception as exc:
                log.warning("W&B finish failed (%s); metrics.jsonl has every logged value", exc)
        if self._file is not None:
            self._file.close()


def wandb_run_id(run_dir: RunDir) -> str:
    """The run's W&B id, kept in the run dir so every restart continues the same W&B run."""
    path = run_dir.wandb_run_id
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    write_text_atomically(path, run_id + "\n")
    return run_id


def start_wandb(run_dir: RunDir, logging_cfg: LoggingConfig, config: dict, run_id: str | None):
    mode = logging_cfg.wandb_mode
    if mode == "disabled":
        return None
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("W&B: no WANDB_API_KEY; logging offline (later: wandb sync --id %s %s/wandb/offline-run-*)",
                    run_id, run_dir)
        mode = "offline"
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            import wandb

            run = wandb.init(
                project=logging_cfg.wandb_project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir.path),
                mode=cast(WandbMode, attempt), config=config,
                settings=wandb.Settings(init_timeout=logging_cfg.wandb_init_timeout_s, console="off", silent=True),
            )
            if attempt != mode:
                log.warning("W&B offline for this run (the server did not answer); its files are under the run's id: "
                            "`wandb sync --id %s %s/wandb/offline-run-*` uploads them later, and the next restart "
                            "goes online again", run_id, run_dir)
            return run
        except Exception as exc:  # W&B must never be the reason training stops
            log.warning("W&B %s start failed (%s: %s)", attempt, type(exc).__name__, str(exc).splitlines()[0][:200])
            if attempt == "online":  # the failed start leaves the id claimed in W&B's service: a fresh one
                _teardown_wandb()
    log.warning("W&B disabled for this run; metrics.jsonl in %s still has every metric", run_dir)
    return None


def _teardown_wandb() -> None:
    try:
        import wandb

        wandb.teardown()
    except Exception as exc:
        log.warning("W&B teardown after a failed start: %s", exc)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _short(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
