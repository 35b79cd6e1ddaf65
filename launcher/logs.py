"""Process-wide logging set-up: a `[rank r/w]` prefix; ranks other than 0 only warn."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path


def setup_logging(rank: int = 0, world_size: int = 1) -> None:
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Libraries below us are chatty at INFO; keep their warnings.
    for name in ("deepspeed", "DeepSpeed", "accelerate", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


class _RunDirLog(logging.FileHandler):
    """A log file that goes quiet, without a traceback, once its disk fails (full, gone)."""

    _failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self._failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True  # the terminal (if any) still has every line


def log_to_file(path: Path) -> Path:
    """Also write this process's log to `path`: a launcher's log outlives its terminal (a closed SSH
    session) and sits in the run directory beside what it launched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunDirLog(path)
    handler.setFormatter(logging.root.handlers[0].formatter if logging.root.handlers else None)
    logging.root.addHandler(handler)
    return path
