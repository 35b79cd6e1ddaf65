"""The DeepSpeed checkpoint engine of synchronous saves: every file written by `save_durably`.

DeepSpeed calls `save(state, path)` for each file of a rank (model states, its optimizer shard); the
file is fsynced and its digest kept, so the checkpoint manager commits without reading it back.
Loading is DeepSpeed's own (`torch.load`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from bigmodel_dist.checkpoint.durable_file import FileDigest, save_durably


class DurableCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params: Any, pool: ThreadPoolExecutor):
        super().__init__(config_params)
        self.name = "DurableCheckpointEngine"
        self._pool = pool
        self._written: dict[str, FileDigest] = {}

    def save(self, state_dict: Any, path: str) -> None:
        self._written[os.path.abspath(path)] = save_durably(state_dict, path, self._pool)

    def take_written(self) -> dict[str, FileDigest]:
        """The files saved since the last call, by absolute path, with their digests."""
        written, self._written = self._written, {}
        return written
