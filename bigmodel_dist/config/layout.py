"""The batch identity: global batch = micro batch x grad accum x data-parallel size, derived and checked here only."""

from __future__ import annotations

from dataclasses import dataclass

from bigmodel_dist.config.schema import TrainConfig
from bigmodel_dist.core.errors import ConfigError, UserInputError


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's sequences are split over ranks and micro-steps."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    data_parallel_size: int

    def tokens_per_step(self, seq_len: int) -> int:
        return self.global_batch_size * seq_len


def derive_batch_layout(train: TrainConfig, data_parallel_size: int) -> BatchLayout:
    """global = micro x grad_accum x data-parallel size, derived and checked here only."""
    per_micro_step = train.micro_batch_size * data_parallel_size
    if train.global_batch_size % per_micro_step:
        raise ConfigError(
            "train.global_batch_size",
            f"{train.global_batch_size} is not divisible by micro_batch_size {train.micro_batch_size} x "
            f"data-parallel size {data_parallel_size} = {per_micro_step}; use a multiple of {per_micro_step}",
        )
    grad_accum = train.global_batch_size // per_micro_step
    if train.grad_accum_steps is not None and train.grad_accum_steps != grad_accum:
        raise ConfigError(
            "train.grad_accum_steps",
            f"{train.grad_accum_steps} breaks global {train.global_batch_size} = micro {train.micro_batch_size} "
            f"x grad_accum x world {data_parallel_size} (needs {grad_accum}); drop it to derive it",
        )
    return BatchLayout(train.global_batch_size, train.micro_batch_size, grad_accum, data_parallel_size)


def sizes_keeping_batch(train: TrainConfig, counts: tuple[int, int], ranks_per_count: int, name: str) -> list[int]:
    """The world sizes `count x ranks_per_count`, for each count in the range `counts` (nodes, workers), that keep
    the global batch: an elastic run resizes only to those. A fixed count is returned as it is (`resolve_run`'s
    error names the batch fields); a range with none is refused, naming `name` (where the range was given)."""
    low, high = counts
    if low == high:
        return [low * ranks_per_count]
    kept = []
    for size in (count * ranks_per_count for count in range(low, high + 1)):
        try:
            derive_batch_layout(train, size)
        except ConfigError:
            continue
        kept.append(size)
    if not kept:
        raise UserInputError(f"{name} {low}..{high}: no size keeps train.global_batch_size={train.global_batch_size} "
                             f"(it must divide by micro_batch_size {train.micro_batch_size} x {ranks_per_count} "
                             "process(es) x the count); change the range or the global batch")
    return kept
