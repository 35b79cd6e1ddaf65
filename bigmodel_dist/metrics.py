"""Metrics of a run: `metrics.jsonl` in the run directory, a progress line or bar, W&B on rank 0.

Only rank 0 writes; every rank may call (others are no-ops), so callers need no rank branches.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bigmodel_dist.config.schema import LoggingConfig

log = logging.getLogger(__name__)

# Dense bf16 peak per device (TFLOP/s), for MFU. Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def device_peak_tflops(logging_cfg: LoggingConfig, device_name: str) -> float | None:
    if logging_cfg.peak_tflops_per_device is not None:
        return logging_cfg.peak_tflops_per_device
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


class MetricsLogger:
    """Writes one JSON line per log call (flushed), shows progress, mirrors to W&B when enabled."""

    def __init__(self, run_dir: Path, logging_cfg: LoggingConfig, config: dict, is_main: bool, max_steps: int):
        self.is_main = is_main
        self._file = None
        self._wandb_run = None
        self._progress = None
        if not is_main:
            return
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(total=max_steps, desc="train", unit="step", dynamic_ncols=True)
        self._wandb_run = _start_wandb(run_dir, logging_cfg, config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)
        line = " ".join(f"{k}={_short(v)}" for k, v in metrics.items())
        if self._progress is not None:
            self._progress.n = step
            self._progress.set_postfix_str(line, refresh=True)
        else:
            log.info("step %d %s", step, line)

    @property
    def wandb_dir(self) -> str | None:
        return self._wandb_run.dir if self._wandb_run is not None else None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        if self._file is not None:
            self._file.close()


def _start_wandb(run_dir: Path, logging_cfg: LoggingConfig, config: dict):
    if logging_cfg.wandb_mode == "disabled":
        return None
    mode = logging_cfg.wandb_mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("W&B: no WANDB_API_KEY; logging offline instead (sync later with `wandb sync`)")
        mode = "offline"
    try:
        import wandb

        return wandb.init(
            project=logging_cfg.wandb_project,
            name=run_dir.name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(init_timeout=30, console="off", silent=True),
        )
    except Exception as exc:  # W&B must never be the reason training stops
        log.warning("W&B disabled for this run: %s: %s", type(exc).__name__, exc)
        return None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _short(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
