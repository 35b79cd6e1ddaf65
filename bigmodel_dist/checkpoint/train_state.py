"""What the training loop has done so far: saved in every checkpoint as one block, restored on resume."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from bigmodel_dist.data.sampler import global_index


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    samples_seen: int = 0  # the data cursor: global samples consumed
    stop_reason: str | None = None  # set when a signal or the time limit ended this run early
    wandb_run_id: str | None = None  # rank 0's; a resumed run continues this W&B run
    # Goodput: wall clock of the whole run (restarts included) and the time spent in steps that count
    # (work redone after a resume does not).
    run_started_at: float = field(default_factory=time.time)
    productive_s: float = 0.0
    # Resilience (see resilience.py): the loss guard's memory, and what rollbacks passed over.
    recent_losses: list[float] = field(default_factory=list)  # the last good steps' losses, oldest first
    bad_streak: int = 0  # bad (skipped) steps in a row up to now
    first_bad_step: int = 0  # the first step of that streak
    skipped_steps: int = 0  # bad steps skipped over the whole run
    rollbacks: int = 0
    skipped_samples: int = 0  # samples passed over by rollbacks, in all
    skipped_ranges: list[list[int]] = field(default_factory=list)  # [start, end) global samples, sorted
    last_rollback_to: int = -1  # the step the last rollback went back to
    lr_scale: float = 1.0  # product of resilience.rollback_lr_factor over the rollbacks
    mixture: list[dict] = field(default_factory=list)  # the data mixture's segments (data/mixture.py)
    # [step, logical samples] where the global batch size of now began (a batch changed on resume)
    batch_origin: list[int] = field(default_factory=lambda: [0, 0])

    def logical_samples(self, step: int, batch: int) -> int:
        """Samples consumed after `step` steps, before skipped ranges: `batch` per step since batch_origin."""
        origin_step, origin_samples = self.batch_origin
        return origin_samples + (step - origin_step) * batch

    def advance(self, tokens: int, batch: int) -> None:
        """One step of `batch` global samples done: the cursor passes over skipped ranges it meets."""
        self.step += 1
        self.tokens_seen += tokens
        self.samples_seen = global_index(self.logical_samples(self.step, batch), self.skipped_ranges)

    def change_batch(self, old_batch: int) -> None:
        """The global batch size changes here (it was `old_batch`): later steps count from this sample."""
        self.batch_origin = [self.step, self.logical_samples(self.step, old_batch)]

    def goodput(self) -> float:
        return self.productive_s / max(1e-9, time.time() - self.run_started_at)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore from a checkpoint's block; `stop_reason` is not carried over (it ended *that* run)."""
        known = {f.name for f in fields(self)} - {"stop_reason"}
        for name, value in saved.items():
            if name in known:
                setattr(self, name, value)


def saved_train_state(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's train-state block; format 1 kept the same values at the top level of the metadata."""
    if "train_state" in meta:
        return meta["train_state"]
    legacy = ("step", "tokens_seen", "samples_seen", "stop_reason", "wandb_run_id", "run_started_at", "productive_s")
    return {name: meta[name] for name in legacy if name in meta}
