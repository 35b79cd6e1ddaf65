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
- A source with a budget (`max_tokens` / `max_epochs`, as a number of its sequences) leaves the mixture
  right after the sample that reaches it: the schedule starts a derived segment there, the others
  sharing its slots by their weights. Derived segments follow from the saved ones, so they are not saved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.quotas import apportion
from bigmodel_dist.data.sampler import ShuffledOrder


@dataclass(frozen=True)
class Segment:
    start: int  # the first global sample it schedules
    weights: tuple[float, ...]  # by source, in `data.sources` order
    consumed: tuple[int, ...]  # samples each source had read before `start`
    window: int  # data.mixture_window when the segment began
    budgets: tuple[int, ...] = ()  # sequences each source may give in all (-1: no budget); () none at all

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": list(self.weights), "consumed": list(self.consumed),
                "budgets": list(self.budgets)}

    @staticmethod
    def from_dict(saved: dict[str, Any]) -> Segment:
        return Segment(int(saved["start"]), tuple(saved["weights"]), tuple(saved["consumed"]), int(saved["window"]),
                       tuple(saved.get("budgets", ())))

    def spent(self) -> list[int]:
        """Sources whose budget is used up when the segment begins."""
        return [k for k, (n, b) in enumerate(zip(self.consumed, self.budgets)) if 0 <= b <= n]


class MixtureSchedule:
    """Global sample index -> (source, that source's sample number)."""

    def __init__(self, segments: Sequence[Segment], seed: int):
        self.saved, self.seed = list(segments), seed  # `saved`: what the training state holds
        self.segments: list[Segment] = []  # the saved ones and those derived from budgets, in order
        self._quotas: list[list[int]] = []
        self._cached: tuple[int, int] | None = None
        self._slots = np.empty(0, dtype=np.int64)  # source of each slot of the cached window
        self._rank = np.empty(0, dtype=np.int64)  # how many slots of the same source come before it
        self.end: int | None = None  # the first global sample no source can give (every budget spent)
        self._consumed_at_end: list[int] = []
        for i, segment in enumerate(self.saved):
            following = self.saved[i + 1].start if i + 1 < len(self.saved) else None
            self._add_with_budgets(segment, following)

    def _add_with_budgets(self, segment: Segment, until: int | None) -> None:
        """`segment`, then a derived segment wherever a source's budget runs out before `until`."""
        while True:
            weights = [0.0 if k in segment.spent() else w for k, w in enumerate(segment.weights)]
            if not any(weights):
                self.end, self._consumed_at_end = segment.start, list(segment.consumed)
                return
            segment = Segment(segment.start, tuple(weights), segment.consumed, segment.window, segment.budgets)
            self.segments.append(segment)
            self._quotas.append(apportion(segment.window, segment.weights))
            self.end = None
            runs_out = self._first_spent(len(self.segments) - 1)
            if runs_out is None or (until is not None and runs_out >= until):
                return
            segment = Segment(runs_out, segment.weights, tuple(self.consumed_at(runs_out)), segment.window,
                              segment.budgets)

    def _first_spent(self, index: int) -> int | None:
        """The global sample right after the one that spends a budget in segment `index`; None if none does."""
        segment, quotas = self.segments[index], self._quotas[index]
        ends = []
        for k, (budget, quota) in enumerate(zip(segment.budgets, quotas)):
            if budget < 0 or quota == 0:
                continue
            w, j = divmod(budget - segment.consumed[k] - 1, quota)  # window and rank of its last sample
            self._window(index, w)
            position = int(np.flatnonzero((self._slots == k) & (self._rank == j))[0])
            ends.append(segment.start + w * segment.window + position + 1)
        return min(ends, default=None)

    def _segment_of(self, g: int) -> int:
        if self.end is not None and g >= self.end:
            raise IndexError(f"global sample {g}: every source of the mixture has used up its budget at {self.end}")
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
        if self.end is not None and g >= self.end:
            return list(self._consumed_at_end)
        index = self._segment_of(g)
        segment, quotas = self.segments[index], self._quotas[index]
        w, offset = divmod(g - segment.start, segment.window)
        self._window(index, w)
        partial = np.bincount(self._slots[:offset], minlength=len(quotas))
        return [segment.consumed[k] + w * quotas[k] + int(partial[k]) for k in range(len(quotas))]

    def spent_at(self, g: int) -> set[int]:
        """Sources whose budget is used up by global samples [0, g)."""
        budgets = self.segments[-1].budgets if self.end is not None and g >= self.end else \
            self.segments[self._segment_of(g)].budgets
        return {k for k, (n, b) in enumerate(zip(self.consumed_at(g), budgets)) if 0 <= b <= n}

    def switched(self, weights: Sequence[float], window: int, at: int,
                 budgets: Sequence[int] = ()) -> MixtureSchedule:
        """The schedule that switches to `weights`, `window` and `budgets` at global sample `at` (a
        curriculum step)."""
        kept = [s for s in self.saved if s.start < at]
        segment = Segment(at, tuple(weights), tuple(self.consumed_at(at)), window, tuple(budgets))
        return MixtureSchedule([*kept, segment], self.seed)


def budgets_in_sequences(max_tokens: Sequence[int], max_epochs: Sequence[float], sizes: Sequence[int],
                         seq_len: int) -> tuple[int, ...]:
    """Each source's budget as a number of its sequences (-1: none); () when no source has one. The
    smaller of a token budget and an epoch budget wins."""
    budgets = []
    for tokens, epochs, size in zip(max_tokens, max_epochs, sizes):
        limits = ([tokens // seq_len] if tokens else []) + ([math.floor(epochs * size + 1e-9)] if epochs else [])
        budgets.append(min(limits, default=-1))
    return tuple(budgets) if any(b >= 0 for b in budgets) else ()


def refuse_short_budgets(end: int | None, needed: int, max_steps: int, global_batch: int) -> None:
    """A one-line error when every source's budget is spent (at sample `end`) before the run's last sample."""
    if end is not None and end < needed:
        raise UserInputError(
            f"data.sources: the sources' budgets (max_tokens / max_epochs) hold {end} training sequences but "
            f"train.max_steps={max_steps} x global batch {global_batch} needs {needed}; raise a budget, give a source "
            "no budget, or lower train.max_steps")


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
        self._spent: set[int] | None = None

    def figures(self, g: int) -> tuple[dict[str, float], list[str]]:
        """Metrics at global sample `g`, and a line for each source that began a new epoch since the last call."""
        consumed = self._schedule.consumed_at(g)
        epochs = [n // size for n, size in zip(consumed, self.sizes)]
        news = [f"source {name} ran out of sequences and began epoch {epoch + 1} (a new order)"
                for name, epoch, before in zip(self.names, epochs, self._epochs or epochs) if epoch > before]
        spent = self._schedule.spent_at(g)
        news += [f"source {self.names[k]} used up its budget ({consumed[k] * self.seq_len} tokens) and leaves the "
                 "mixture; the other sources share its slots" for k in sorted(spent - (spent if self._spent is None else self._spent))]
        self._epochs, self._spent = epochs, spent
        metrics: dict[str, float] = {}
        for name, n, epoch in zip(self.names, consumed, epochs):
            metrics[f"data/{name}/tokens_seen"] = n * self.seq_len
            metrics[f"data/{name}/epoch"] = epoch
        return metrics, news
