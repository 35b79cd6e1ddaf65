"""The data position the loop reads from: the loader from the cursor on and, for a mixture, the schedule of
segments the training state holds (switched at the cursor when the config's weights, window or budgets
changed: a curriculum, recorded as a `mixture` incident, never silent)."""

from __future__ import annotations

import torch

from bigmodel_dist.checkpoint.train_state import TrainState
from bigmodel_dist.core.distributed import DistributedFacts
from bigmodel_dist.data.batch_loader import BatchLoader
from bigmodel_dist.data.dataset import MixedDataset, PackedDataset
from bigmodel_dist.data.ledger import SampleLedger
from bigmodel_dist.data.mixture import (
    MixtureProgress,
    MixtureReader,
    MixtureSchedule,
    Segment,
    budgets_in_sequences,
    refuse_short_budgets,
)
from bigmodel_dist.data.sampler import global_index
from bigmodel_dist.metrics.logger import MetricsLogger
from bigmodel_dist.run.resolve import ResolvedRun
from bigmodel_dist.training.window_metrics import WindowMetrics


def open_loader(dataset: PackedDataset | MixedDataset, resolved: ResolvedRun, facts: DistributedFacts,
                state: TrainState, ledger: SampleLedger, window_metrics: WindowMetrics) -> BatchLoader:
    """The loader from the cursor on (and, for a mixture, the schedule the training state holds)."""
    cfg, read = resolved.config, None
    if isinstance(dataset, MixedDataset):
        segments = [Segment.from_dict(s) for s in state.mixture]
        read = MixtureReader(dataset.sources, MixtureSchedule(segments, cfg.seed), cfg.seed)
        window_metrics.mixture = MixtureProgress(dataset.names, [len(s) for s in dataset.sources], segments, cfg.seed,
                                                 dataset.seq_len)
    return BatchLoader(dataset.train, resolved.layout, facts.rank, cfg.seed, start_step=state.step,
                       prefetch=cfg.data.prefetch, pin_memory=torch.cuda.is_available(), skipped=state.skipped_ranges,
                       read=read, ledger=ledger, origin=state.batch_origin)


def sync_mixture(dataset: PackedDataset | MixedDataset, resolved: ResolvedRun, state: TrainState,
                 metrics: MetricsLogger) -> None:
    """The mixture's segments in the training state: the checkpoint's, switched to the config's weights,
    window and budgets at the cursor when they changed. Nothing for a single source."""
    cfg = resolved.config
    data = cfg.data
    if not isinstance(dataset, MixedDataset):
        return
    weights = tuple(data.source_weights().values())
    budgets = budgets_in_sequences([s.max_tokens for s in data.sources], [s.max_epochs for s in data.sources],
                                   [len(rows) for rows in dataset.sources], dataset.seq_len)
    segments = [Segment.from_dict(s) for s in state.mixture] or \
        [Segment(0, weights, (0,) * len(weights), data.mixture_window, budgets)]
    schedule = MixtureSchedule(segments, cfg.seed)
    if (segments[-1].weights, segments[-1].window, segments[-1].budgets) != (weights, data.mixture_window, budgets):
        at = state.samples_seen
        schedule = schedule.switched(weights, data.mixture_window, at, budgets)
        metrics.incident(state.step, "mixture", at_sample=at, window=data.mixture_window,
                         weights=dict(zip(data.source_weights(), weights)),
                         budgets=dict(zip(data.source_weights(), budgets)))
    state.mixture = [s.as_dict() for s in schedule.saved]
    # Every budget spent before the run's last step would leave steps without data: refuse now.
    batch = resolved.layout.global_batch_size
    last = state.logical_samples(cfg.train.max_steps, batch)
    refuse_short_budgets(schedule.end, global_index(last, state.skipped_ranges), cfg.train.max_steps, batch)
