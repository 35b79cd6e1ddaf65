"""The learning rate of each step: linear warmup, then cosine decay (the trainer owns the schedule; a
DeepSpeed `scheduler` block is dropped)."""

from __future__ import annotations

import math

from bigmodel_dist.config.schema import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (step counts from 0)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
