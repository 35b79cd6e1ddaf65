"""Process-wide logging set-up: a `[rank r/w]` prefix; ranks other than 0 only warn."""

from __future__ import annotations

import logging
import sys
import warnings


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
