"""Which samples each rank reads at each (step, micro-step): seeded, per-epoch shuffled, world-size free.

Optimizer step `s` consumes logical samples [s*G, (s+1)*G) whatever the number of ranks; inside it,
micro-step `m` of rank `r` takes the slice starting at (m * dp + r) * micro. A logical sample is the
global sample at the same index, passing over the ranges a rollback skipped (poisoned data, see
`resilience.py`). So the position in the data is one integer (global samples consumed) plus the
skipped ranges, and a run may resume on a different world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bigmodel_dist.config.layout import BatchLayout


class ShuffledOrder:
    """Global sample index -> sequence index, reshuffled each epoch from (seed, epoch)."""

    def __init__(self, num_sequences: int, seed: int):
        if num_sequences < 1:
            raise ValueError("need at least one sequence")
        self.num_sequences = num_sequences
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def __getitem__(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.num_sequences)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._epoch = epoch
        return int(self._perm[offset])


def global_index(logical: int, skipped: Sequence[Sequence[int]] = ()) -> int:
    """The global sample read at logical position `logical`, passing over the `skipped` ranges
    ([start, end) in global indices, sorted, disjoint)."""
    index = logical
    for start, end in skipped:
        if index >= start:
            index += end - start
    return index


def micro_batch_indices(layout: BatchLayout, step: int, micro_step: int, rank: int,
                        skipped: Sequence[Sequence[int]] = (), origin: Sequence[int] = (0, 0)) -> list[int]:
    """Global sample indices of one micro-batch of one rank; `skipped`: ranges passed over by rollbacks;
    `origin`: (step, samples) where this global batch size began (a run that changed it on resume)."""
    first = origin[1] + (step - origin[0]) * layout.global_batch_size
    start = first + (micro_step * layout.data_parallel_size + rank) * layout.micro_batch_size
    return [global_index(start + i, skipped) for i in range(layout.micro_batch_size)]


def eval_batch_indices(layout: BatchLayout, batch_index: int, rank: int, num_sequences: int) -> list[int]:
    """Validation sequence indices of one evaluation micro-batch of one rank: in order, no shuffle, so
    every evaluation reads the same sequences; wraps around a small split."""
    start = (batch_index * layout.data_parallel_size + rank) * layout.micro_batch_size
    return [(start + i) % num_sequences for i in range(layout.micro_batch_size)]
