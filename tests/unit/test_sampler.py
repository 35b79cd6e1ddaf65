"""Per-rank batches: disjoint and complete per step, independent of the world size (simulated ranks)."""

from __future__ import annotations

import pytest

from bigmodel_dist.config.layout import BatchLayout
from bigmodel_dist.data.sampler import ShuffledOrder, micro_batch_indices


def _step_samples(layout: BatchLayout, step: int) -> dict[int, list[int]]:
    per_rank = {}
    for rank in range(layout.data_parallel_size):
        per_rank[rank] = [i for m in range(layout.grad_accum_steps) for i in micro_batch_indices(layout, step, m, rank)]
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_are_disjoint_and_cover_each_global_batch(world):
    layout = BatchLayout(global_batch_size=24, micro_batch_size=2, grad_accum_steps=12 // world, data_parallel_size=world)
    for step in range(5):
        per_rank = _step_samples(layout, step)
        flat = [i for indices in per_rank.values() for i in indices]
        assert sorted(flat) == list(range(step * 24, (step + 1) * 24))


def test_each_step_covers_the_same_samples_on_any_world_size():
    layouts = [BatchLayout(24, 2, 12 // w, w) for w in (1, 2, 3, 4)]
    for step in range(3):
        covered = [sorted(i for v in _step_samples(lay, step).values() for i in v) for lay in layouts]
        assert all(c == covered[0] for c in covered)


def test_shuffled_order_is_a_seeded_permutation_per_epoch():
    order = ShuffledOrder(50, seed=7)
    epoch0 = [order[i] for i in range(50)]
    epoch1 = [order[i] for i in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    again = ShuffledOrder(50, seed=7)
    assert [again[i] for i in range(60, 70)] == [order[i] for i in range(60, 70)]
