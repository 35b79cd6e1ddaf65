"""Held-out loss: which batches each rank evaluates, when, and the mean over ranks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bigmodel_dist.config.layout import BatchLayout
from bigmodel_dist.data.sampler import eval_batch_indices


class Evaluator:
    """`eval_batches` micro-batches per rank of the validation split, the same ones every time."""

    def __init__(self, val_rows, layout: BatchLayout, rank: int, every: int, batches: int):
        self._rows, self._layout, self._rank = val_rows, layout, rank
        self.every, self.batches = every, batches

    def due(self, step: int, last_step: bool) -> bool:
        """Every `every` steps, and at the end of the budget (`last_step`); never when `every` is 0."""
        return bool(self.every) and (step % self.every == 0 or last_step)

    @torch.no_grad()
    def mean_loss(self, engine, accelerator, device: torch.device, on_batch: Callable[[], None] = lambda: None) -> float:
        """Collective: the mean loss over every rank's batches. `on_batch`: called before each (progress)."""
        engine.eval()
        total = torch.zeros((), device=device)
        for batch_index in range(self.batches):
            on_batch()
            indices = eval_batch_indices(self._layout, batch_index, self._rank, len(self._rows))
            batch = torch.from_numpy(np.stack([self._rows[i] for i in indices]).astype(np.int64)).to(device)
            total += engine(input_ids=batch, labels=batch).loss.float()
        return float(accelerator.reduce(total / self.batches, reduction="mean"))
