"""Weighted mixtures of sources: which source, and which of its sequences, each global sample reads.

The schedule is a pure function of the config and the global sample index `g`, so the cursor is still
one integer and a run resumes exactly on any world size:

- Windows of `data.mixture_window` (W) consecutive samples, counted from the start of the schedule's
  segment (each segment keeps the window it was made with). In every window source k gets exactly q_k = its largest-remainder share of W slots (exactly
  weight_k x W when that is whole), in an order permuted by (seed, segment, window).
- The j-th slot of source k in window w reads that source's sample number A_k + w q_k + j, where A_k is
  what the source had read when the segment began; each source reads its own sequences in its own
  seeded order, reshuffled each epoch. A source that runs out starts a new epoch (logged).
- Weights changed on resume (a curriculum) start a new segment at the cursor: each source goes on where
  it stood. The segments are part of the training state, saved in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bigmodel_dist.data.quotas import apportion
from bigmodel_dist.data.sampler import ShuffledOrder


@dataclass(frozen=True)
class Segment:
    start: int  # the first global sample it schedules
    weights: tuple[float, ...]  # by source, in `data.sources` order
    consumed: tuple[int, ...]  # samples each source had read before `start`
    window: int  # data.mixture_window when the segment began

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": list(self.weights), "consumed": list(self.consumed)}

    @staticmethod
    def from_dict(saved: dict[str, Any]) -> Segment:
        return Segment(int(saved["start"]), tuple(saved["weights"]), tuple(saved["consumed"]), int(saved["window"]))


class MixtureSchedule:
    """Global sample index -> (source, that source's sample number)."""

    def __init__(self, segments: Sequence[Segment], seed: int):
        self.segments, self.seed = list(segments), seed
        self._quotas = [apportion(s.window, s.weights) for s in self.segments]
        self._cached: tuple[int, int] | None = None
        self._slots = np.empty(0, dtype=np.int64)  # source of each slot of the cached window
        self._rank = np.empty(0, dtype=np.int64)  # how many slots of the same source come before it

    def _segment_of(self, g: int) -> int:
        return max(i for i, s in enumerate(self.segments) if s.start <= g)

    def _window(self, segment: int, w: int) -> None:
        if self._cached == (segment, w):
            return
        slots = np.repeat(np.arange(len(self._quotas[segment])), self._quotas[segment])
        np.random.default_rng([self.seed, segment, w]).shuffle(slots)
        rank = np.zeros(len(slots), dtype=np.int64)
        seen = np.zeros(len(self._quotas[segment]), dtype=np.int64)
        for i, source in enumerate(slots):
            rank[i] = seen[source]
            seen[source] += 1
        self._cached, self._slots, self._rank = (segment, w), slots, rank

    def locate(self, g: int) -> tuple[int, int]:
        index = self._segment_of(g)
        segment = self.segments[index]
        w, offset = divmod(g - segment.start, segment.window)
        self._window(index, w)
        source = int(self._slots[offset])
        return source, segment.consumed[source] + w * self._quotas[index][source] + int(self._rank[offset])

    def consumed_at(self, g: int) -> list[int]:
        """Samples each source has given to global samples [0, g)."""
        index = self._segment_of(g)
        segment, quotas = self.segments[index], self._quotas[index]
        w, offset = divmod(g - segment.start, segment.window)
        self._window(index, w)
        partial = np.bincount(self._slots[:offset], minlength=len(quotas))
        return [segment.consumed[k] + w * quotas[k] + int(partial[k]) for k in range(len(quotas))]

    def switched(self, weights: Sequence[float], window: int, at: int) -> MixtureSchedule:
        """The schedule that switches to `weights` and `window` at global sample `at` (a curriculum step)."""
        kept = [s for s in self.segments if s.start < at]
        return MixtureSchedule([*kept, Segment(at, tuple(weights), tuple(self.consumed_at(at)), window)], self.seed)


class MixtureReader:
    """Reads global sample `g` of a mixture: its source's sequence in that source's epoch order."""

    def __init__(self, sources: Sequence[Any], schedule: MixtureSchedule, seed: int):
        self.sources, self.schedule = list(sources), schedule
        # Source 0 keeps the single-pool order: a one-source mixture reads exactly what `data.paths` read.
        self._orders = [ShuffledOrder(len(rows), seed if k == 0 else seed + 7919 * k) for k, rows in
                        enumerate(self.sources)]

    def __call__(self, g: int) -> np.ndarray:
        source, n = self.schedule.locate(g)
        return self.sources[source][self._orders[source][n]]

    def epochs_at(self, g: int) -> list[int]:
        """The epoch each source is in after global samples [0, g) (0: its first pass)."""
        return [n // len(rows) for n, rows in zip(self.schedule.consumed_at(g), self.sources)]


class MixtureProgress:
    """Per-source samples, tokens and epochs at the cursor, for the log. Its own schedule: the loader's
    thread reads another."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int], segments: Sequence[Segment], seed: int,
                 seq_len: int):
        self.names, self.sizes, self.seq_len = list(names), list(sizes), seq_len
        self._schedule = MixtureSchedule(segments, seed)
        self._epochs: list[int] | None = None

    def figures(self, g: int) -> tuple[dict[str, float], list[str]]:
        """Metrics at global sample `g`, and a line for each source that began a new epoch since the last call."""
        consumed = self._schedule.consumed_at(g)
        epochs = [n // size for n, size in zip(consumed, self.sizes)]
        news = [f"source {name} ran out of sequences and began epoch {epoch + 1} (a new order)"
                for name, epoch, before in zip(self.names, epochs, self._epochs or epochs) if epoch > before]
        self._epochs = epochs
        metrics: dict[str, float] = {}
        for name, n, epoch in zip(self.names, consumed, epochs):
            metrics[f"data/{name}/tokens_seen"] = n * self.seq_len
            metrics[f"data/{name}/epoch"] = epoch
        return metrics, news
