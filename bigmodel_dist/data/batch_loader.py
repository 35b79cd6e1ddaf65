"""Per-rank micro-batches in training order, prepared ahead by a background thread.

The position in the data is one number, the global samples consumed (`step * global_batch_size`, or
from the step where a resumed run changed its global batch size: `origin`), so a loader rebuilt at any
step, on any world size, continues exactly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from bigmodel_dist.config.layout import BatchLayout
from bigmodel_dist.data.ledger import SampleLedger
from bigmodel_dist.data.sampler import ShuffledOrder, micro_batch_indices


def micro_batch(rows, order: ShuffledOrder, layout: BatchLayout, step: int, micro_step: int, rank: int,
                skipped: Sequence[Sequence[int]] = ()) -> np.ndarray:
    return read_micro_batch(lambda i: rows[order[i]], layout, step, micro_step, rank, skipped)


def read_micro_batch(read: Callable[[int], np.ndarray], layout: BatchLayout, step: int, micro_step: int, rank: int,
                     skipped: Sequence[Sequence[int]] = (), origin: Sequence[int] = (0, 0)) -> np.ndarray:
    """One micro-batch; `read(g)`: the sequence global sample `g` is (a shuffled pool, or a mixture)."""
    indices = micro_batch_indices(layout, step, micro_step, rank, skipped, origin)
    return np.stack([read(i) for i in indices]).astype(np.int64)


class BatchLoader:
    """Yields this rank's micro-batches from `start_step` on, `prefetch` ahead of the consumer.
    `skipped`: the [start, end) ranges of global samples that rollbacks passed over."""

    def __init__(self, rows, layout: BatchLayout, rank: int, seed: int, start_step: int = 0,
                 prefetch: int = 4, pin_memory: bool = False, skipped: Sequence[Sequence[int]] = (),
                 read: Callable[[int], np.ndarray] | None = None, ledger: SampleLedger | None = None,
                 origin: Sequence[int] = (0, 0)):
        """`rows`: one pool of sequences, read in a seeded per-epoch order; or `read(g)` gives global
        sample g's sequence (a mixture of sources) and `rows` is not used."""
        self._layout, self._rank = layout, rank
        self.skipped = [list(r) for r in skipped]
        self.origin = tuple(origin)  # (step, samples) where this global batch size began
        if read is None:
            order = ShuffledOrder(len(rows), seed)
            read = lambda i: rows[order[i]]  # noqa: E731
        self._read = read
        self._ledger = ledger  # opt-in audit of the samples read (data/ledger.py)
        self._pin = pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(start_step,), daemon=True, name="batch-loader")
        self._thread.start()

    def _positions(self, start_step: int) -> Iterator[tuple[int, int]]:
        step = start_step
        while True:
            for micro_step in range(self._layout.grad_accum_steps):
                yield step, micro_step
            step += 1

    def _fill(self, start_step: int) -> None:
        try:
            for step, micro_step in self._positions(start_step):
                batch = torch.from_numpy(read_micro_batch(self._read, self._layout, step, micro_step, self._rank,
                                                          self.skipped, self.origin))
                item = (step, micro_step, batch.pin_memory() if self._pin else batch)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # surfaced to the consumer, not lost in the thread
            self._queue.put((-1, -1, exc))

    def indices(self, step: int, micro_step: int) -> list[int]:
        """The global sample indices of this rank's micro-batch at (step, micro_step)."""
        return micro_batch_indices(self._layout, step, micro_step, self._rank, self.skipped, self.origin)

    def next(self, step: int, micro_step: int) -> torch.Tensor:
        got_step, got_micro, batch = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        assert (got_step, got_micro) == (step, micro_step), f"loader at {(got_step, got_micro)}, trainer at {(step, micro_step)}"
        if self._ledger is not None:
            self._ledger.record(step, micro_step, self.indices(step, micro_step))
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
