"""A DeepSpeed checkpoint engine that snapshots instead of writing (for `checkpoint.async_save`).

It replaces the engine's torch checkpoint engine: `save()` copies the state to host memory and queues
it; `checkpoint/async_writer.py` writes the queue in the background. Imported only for async saves
(it pulls in DeepSpeed).
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def snapshot(value: Any) -> Any:
    """A host-memory copy of every tensor in a nested state (the originals keep training)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.pending: list[tuple[Any, str]] = []

    def save(self, state_dict: Any, path: str) -> None:
        self.pending.append((snapshot(state_dict), path))

    def take_pending(self) -> list[tuple[Any, str]]:
        pending, self.pending = self.pending, []
        return pending
