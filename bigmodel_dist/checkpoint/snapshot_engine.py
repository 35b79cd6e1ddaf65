"""A DeepSpeed checkpoint engine that stages instead of writing (for `checkpoint.async_save`).

It replaces the engine's checkpoint engine: `save()` copies the state into host-memory staging buffers
and queues it; `checkpoint/async_writer.py` writes the queue in the background. The buffers are kept and
reused by the next save of the same file (same tensor shapes in the same places): the loop then pays
only for a copy into memory already mapped, not for allocating and faulting in a checkpoint's worth of
pages. On a GPU the buffers are pinned, so the copy runs at the device-to-host link's speed.

At most one staged checkpoint per rank exists: the checkpoint manager waits for the previous write to
finish before the next save copies into the same buffers. Imported only for async saves (it pulls in
DeepSpeed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _staging_buffer(like: torch.Tensor) -> torch.Tensor:
    pinned = like.is_cuda and torch.cuda.is_available()
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pinned)


def stage(value: Any, previous: Any = None) -> Any:
    """A host-memory copy of every tensor in a nested state (the originals keep training), written into
    `previous`'s tensors where the structure, shape and dtype match, into new buffers elsewhere. A tensor
    that appears twice (tied embeddings) is staged once and appears twice, as torch.save would keep it."""
    return _stage(value, previous, {}, set())


def _stage(value: Any, previous: Any, staged: dict[tuple, torch.Tensor], claimed: set[int]) -> Any:
    """`staged`: this call's buffer of each live tensor; `claimed`: ids of the buffers in it."""
    if isinstance(value, torch.Tensor):
        key = (value.data_ptr(), value.shape, value.stride(), value.dtype, value.device)
        if key in staged:
            return staged[key]
        reusable = (isinstance(previous, torch.Tensor) and previous.shape == value.shape
                    and previous.dtype == value.dtype and id(previous) not in claimed)
        buffer = previous if reusable else _staging_buffer(value)  # never one buffer for two live tensors
        buffer.copy_(value.detach(), non_blocking=value.is_cuda)
        staged[key] = buffer
        claimed.add(id(buffer))
        return buffer
    if isinstance(value, dict):
        old = previous if isinstance(previous, dict) else {}
        return {key: _stage(item, old.get(key), staged, claimed) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        before = previous if type(previous) is type(value) and len(previous) == len(value) else [None] * len(value)
        copies = [_stage(item, old, staged, claimed) for item, old in zip(value, before)]
        return copies if isinstance(value, list) else type(value)(copies)
    return value


def tensor_bytes(value: Any) -> int:
    """Bytes of the distinct tensors in a nested state."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in _tensors(value)}.values())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.name = "SnapshotCheckpointEngine"
        self.pending: list[tuple[Any, str]] = []
        self._staged: dict[str, Any] = {}  # file name (same at every step) -> its staged state

    def save(self, state_dict: Any, path: str) -> None:
        name = Path(path).name
        self._staged[name] = stage(state_dict, self._staged.get(name))
        self.pending.append((self._staged[name], path))

    def commit(self, info: Any) -> bool:
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the pinned copies are complete before any write
        return True

    def take_pending(self) -> list[tuple[Any, str]]:
        pending, self.pending = self.pending, []
        return pending

    @property
    def staging_bytes(self) -> int:
        """Host memory held by the staging buffers: one checkpoint's share of this rank."""
        return tensor_bytes(self._staged)
