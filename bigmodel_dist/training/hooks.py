"""What the loop tells the outside at named points of a step: where this rank is (for its node's hang
watchdog) and, in tests and drills only, the faults injected there. No hook changes a step's arithmetic
except `scale_loss`, which only an injected `nan` fault uses.

The points, in the order a step reaches them: before_data -> before_forward -> in_forward -> scale_loss ->
before_backward; before_collective at every all-rank call; in_eval per eval batch; before_save for saves,
loads and conversions (the save limit applies); at_shutdown once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from bigmodel_dist.ft.faults import Faults
from bigmodel_dist.ft.progress import ProgressRecorder


class LoopHooks:
    def __init__(self, progress: ProgressRecorder, faults: Faults, rank: int):
        self.progress, self.faults, self.rank = progress, faults, rank

    def before_data(self, step: int) -> None:
        self.progress.mark("data", step)

    def before_forward(self, step: int) -> None:
        self.progress.mark("forward", step)

    def in_forward(self, step: int) -> None:
        """Inside the timed compute: a hung or slow rank is injected here."""
        if self.faults:
            self.faults.in_forward(self.rank, step)

    def scale_loss(self, loss: torch.Tensor, sample_indices: Callable[[], list[int]]) -> torch.Tensor:
        """The loss as computed, or (an injected `nan` fault on these samples) poisoned."""
        return loss * self.faults.loss_scale(sample_indices()) if self.faults else loss

    def before_backward(self, step: int) -> None:
        self.progress.mark("backward", step)

    def before_collective(self, step: int) -> None:
        self.progress.mark("collective", step)

    def in_eval(self, step: int) -> None:
        self.progress.mark("eval", step)

    def before_save(self, step: int) -> None:
        self.progress.mark("save", step)

    @contextmanager
    def during(self, phase: str, step: int) -> Iterator[None]:
        """A long phase outside the step (preparing data, converting a checkpoint): marked every few seconds."""
        with self.progress.heartbeat(phase, step):
            yield

    def at_shutdown(self, step: int) -> None:
        self.progress.mark("shutdown", step)
